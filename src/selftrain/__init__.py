"""selftrain: pre-training and (multi-task) self-training of visual backbones.

The pipeline is ``sources -> pretrain -> teach -> label -> student -> transfer -> report``;
each stage is one module of this package (see the README for the map).
"""

__version__ = "0.1.0"
