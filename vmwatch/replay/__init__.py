"""Record a monitoring session and replay it through rules with no hypervisor (DESIGN.md).

``recorder`` wraps an engine Source and writes the file, ``recording`` reads and checks it,
``player`` turns it back into a Source, ``base_image`` names and checks the image a recording
sits on, ``format`` is the file format (docs/recording-format.md).
"""

from vmwatch.replay.player import open_replay as open_replay
from vmwatch.replay.recording import Recording as Recording
from vmwatch.replay.recorder import Recorder as Recorder
from vmwatch.replay.recorder import recording_source as recording_source
