"""The generation engine: queue → scheduler → executor, on a dedicated worker thread.

Knows nothing of HTTP; see :mod:`service.engine.engine`.
"""

from service.engine.engine import Engine, Observer
from service.engine.job import (DeadlineExceeded, EngineClosed, EngineError, GenerationFailed, GenerationResult,
                                GenerationSpec, Job, Preview, Progress, QueueFull, Refused)

__all__ = ["DeadlineExceeded", "Engine", "EngineClosed", "EngineError", "GenerationFailed", "GenerationResult",
           "GenerationSpec", "Job", "Observer", "Preview", "Progress", "QueueFull", "Refused"]
