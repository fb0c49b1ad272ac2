"""Multi-task self-training (MuST, Ghiasi et al. 2021): specialized teachers label one pool, one
multi-task student learns every task, and its backbone is what transfers.

====================  ===========================================================================
module                what it holds
====================  ===========================================================================
``teachers``          teacher specs (train, checkpoint, timm, torchvision, callable, none), each with
                      its own preprocessing; the :class:`~selftrain.must.teachers.TeacherCallable` interface
``label``             ``must-label``: every teacher labels the pool into one multi-task store; ground
                      truth replaces pseudo labels and the store records which is which
``data``              the store read for the student: joint batches or one task per step
``network``           shared backbone with a feature pyramid, one head per task
``student``           ``must-student``: masked per-task losses, heuristic / normalized / user weights
``transfer``          the student's and teachers' measurements; the backbones for the transfer benchmark
``benchmark``         ``must-transfer``: every init fine-tuned / probed on held-out downstream tasks
``benchmark_report``  the report's "MuST transfer" table and its matches-or-beats verdict
``pipeline``          ``selftrain must``: the stages in one output folder
====================  ===========================================================================
"""
