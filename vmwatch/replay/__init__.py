"""Record a monitoring session and replay it through rules with no hypervisor (DESIGN.md).

``recorder`` wraps a Target and writes the file, ``player`` turns the file back into a Target,
``format`` is the file format (docs/recording-format.md).
"""

from vmwatch.replay.player import Recording as Recording
from vmwatch.replay.player import open_recording as open_recording
from vmwatch.replay.recorder import Recorder as Recorder
from vmwatch.replay.recorder import recording_target as recording_target
