"""Record a monitoring session and replay it through rules with no hypervisor (DESIGN.md).

``recorder`` wraps an engine Source and writes the file, ``player`` turns the file back into one,
``format`` is the file format (docs/recording-format.md).
"""

from vmwatch.replay.player import Recording as Recording
from vmwatch.replay.player import open_replay as open_replay
from vmwatch.replay.recorder import Recorder as Recorder
from vmwatch.replay.recorder import recording_source as recording_source
