"""The engine: a trio pump from a source's events through rules to alert sinks (DESIGN.md "engine/")."""

from vmwatch.engine.alerts import Alert as Alert
from vmwatch.engine.governance import Budget as Budget
from vmwatch.engine.guest import Guest as Guest
from vmwatch.engine.pump import Engine as Engine
from vmwatch.engine.pump import WatchOptions as WatchOptions
from vmwatch.engine.pump import WatchSummary as WatchSummary
from vmwatch.engine.pump import watch as watch
from vmwatch.engine.sinks import EventRecord as EventRecord
from vmwatch.engine.sinks import JsonLinesSink as JsonLinesSink
from vmwatch.engine.sinks import ListSink as ListSink
from vmwatch.engine.sinks import SqliteSink as SqliteSink
from vmwatch.engine.sources import ImageSource as ImageSource
from vmwatch.engine.sources import SyntheticSource as SyntheticSource
