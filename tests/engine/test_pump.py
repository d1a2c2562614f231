"""The pump on synthetic streams: dispatch, narrowing, failures, sinks, storms, governance, ending."""

from __future__ import annotations

import trio
import trio.testing

from vmwatch.cpu import Registers
from vmwatch.engine import Budget, Engine, ListSink, SyntheticSource, WatchOptions, watch
from vmwatch.errors import LinkClosedError
from vmwatch.events import Breakpoint, Demotion, Exec, MemoryAccess, Access, ProcessStart, RegisterWrite, Tick
from vmwatch.rules import RuleSet, rule, rules_of


def ruleset(*funcs, pack: str = "t") -> RuleSet:
    return RuleSet(rules_of({f.__name__: f for f in funcs} | {"__name__": funcs[0].__module__}, pack))


def bps(addresses, start=0):
    return [Breakpoint(seq=start + i, time_ns=i, address=a) for i, a in enumerate(addresses)]


class StreamSource:
    """A plain event stream (no batches), as live sources are."""

    def __init__(self, stream, capabilities=()):
        self.name = "stream"
        self.memory = None
        self.realtime = False
        self.capabilities = frozenset(capabilities)
        self._stream = stream

    async def add_breakpoint(self, vaddr, *, entry=False):
        pass

    async def remove_breakpoint(self, vaddr):
        pass

    def events(self):
        return self._stream


class SlowSink(ListSink):
    """Takes ``delay`` seconds per item (on the test clock)."""

    def __init__(self, delay: float) -> None:
        super().__init__("slow")
        self.delay = delay

    async def send(self, item) -> None:
        await trio.sleep(self.delay)
        await super().send(item)


class TestDispatch:
    async def test_only_listeners_of_the_address_run(self):
        """A breakpoint event reaches the rules on its address and no others."""
        seen = {"a": [], "b": []}

        @rule.on_breakpoint(0x1000)
        def on_a(event, guest):
            seen["a"].append(event.seq)

        @rule.on_breakpoint(0x2000)
        def on_b(event, guest):
            seen["b"].append(event.seq)

        summary = await watch(SyntheticSource(bps([0x1000, 0x2000, 0x1000, 0x3000])), ruleset(on_a, on_b), [])
        assert seen == {"a": [0, 2], "b": [1]}
        assert summary.events == 4  # three armed traps plus SourceEnded
        assert summary.end_reason == "stream ended"

    async def test_unarmed_address_is_never_delivered(self):
        """The synthetic hypervisor only reports armed traps, as a real one does."""
        source = SyntheticSource(bps([0x1000, 0x3000]))
        await watch(source, ruleset(_noop_bp), [])
        assert source.delivered == 1 and source.suppressed == 1

    async def test_register_interrupt_and_os_events_by_key(self):
        """Register writes go by register name, OS events by class."""
        got = []

        @rule.on_register("CR4")
        def cr4(event, guest):
            got.append(("cr4", event.new))

        @rule.on(Exec)
        def execs(event, guest):
            got.append(("exec", event.filename))

        events = [RegisterWrite(seq=1, register="cr0", old=1, new=2), RegisterWrite(seq=2, register="cr4", old=1, new=3),
                  Exec(seq=3, pid=5, filename="/bin/ls"), ProcessStart(seq=4, pid=6)]
        await watch(SyntheticSource(events), ruleset(cr4, execs), [])
        assert got == [("cr4", 3), ("exec", "/bin/ls")]

    async def test_narrowing_by_pid_comm_and_cr3(self):
        """Narrowed listeners only see their process."""
        got = []

        @rule.on(ProcessStart, comm="sh")
        def only_sh(event, guest):
            got.append(("comm", event.pid))

        @rule.on(ProcessStart, pid=7)
        def only_7(event, guest):
            got.append(("pid", event.pid))

        @rule.on_breakpoint(0x1000, cr3=0x5000)
        def only_cr3(event, guest):
            got.append(("cr3", event.seq))

        regs = {0: Registers(cr3=0x5000 | (1 << 12) | 3)}  # PTI user half and PCID bits are ignored
        events = [ProcessStart(seq=1, pid=7, comm="ls"), ProcessStart(seq=2, pid=8, comm="sh"),
                  Breakpoint(seq=3, address=0x1000)]
        await watch(SyntheticSource(events, registers=regs), ruleset(only_sh, only_7, only_cr3), [])
        assert sorted(got) == [("comm", 8), ("cr3", 3), ("pid", 7)]
        got.clear()
        regs[0] = Registers(cr3=0x9000)
        await watch(SyntheticSource([Breakpoint(seq=1, address=0x1000)], registers=regs), ruleset(only_cr3), [])
        assert got == []


@rule.on_breakpoint(0x1000)
def _noop_bp(event, guest):
    pass


class TestFailures:
    async def test_rule_that_raises_is_reported_and_isolated(self):
        """A raising rule becomes an engine alert, then is isolated; other rules and the watch go on."""
        calls = {"good": 0, "bad": 0}

        @rule.on_breakpoint(0x1000)
        def bad(event, guest):
            calls["bad"] += 1
            raise ValueError("boom")

        @rule.on_breakpoint(0x1000)
        def good(event, guest):
            calls["good"] += 1

        sink = ListSink()
        summary = await watch(SyntheticSource(bps([0x1000] * 20)), ruleset(bad, good), [sink],
                              options=WatchOptions(max_rule_errors=3))
        assert calls == {"good": 20, "bad": 3}
        assert summary.isolated == ["t.bad"] and summary.rule_errors == {"t.bad": 3}
        messages = [a.message for a in sink.alerts]
        assert messages[0] == "rule t.bad raised ValueError: boom"
        assert "isolated after 3 errors" in messages[1]
        assert [r.kind for r in sink.events].count("RuleFailure") == 3

    async def test_dying_source_ends_the_watch_with_alerts_flushed(self, autojump_clock):
        """A source that raises (QEMU died) ends the watch; alerts raised before reach every sink."""

        async def dying():
            for i in range(5):
                yield Breakpoint(seq=i, address=0x1000)
            raise LinkClosedError("QEMU closed the connection")

        source = StreamSource(dying(), capabilities={"breakpoints"})

        @rule.on_breakpoint(0x1000)
        def each(event, guest):
            guest.alert("warning", f"hit {event.seq}")

        sinks = [ListSink("a"), SlowSink(0.5)]
        summary = await watch(source, ruleset(each), sinks)
        assert summary.end_reason == "source failed: QEMU closed the connection"
        for sink in sinks:
            assert [a.message for a in sink.alerts] == [f"hit {i}" for i in range(5)]
            assert sink.events[-1].kind == "SourceEnded" and sink.closed

    async def test_link_closing_under_a_tick_ends_the_watch_cleanly(self, autojump_clock):
        """A live source whose link closes while a tick pauses it (QEMU frozen, then given up):
        the tick's LinkClosedError is no crash; the stream's SourceEnded ends the watch."""
        from vmwatch.events import SourceEnded

        gone = trio.Event()

        async def frozen():
            yield Breakpoint(seq=0, address=0x1000)
            await gone.wait()
            yield SourceEnded(seq=1, reason="QEMU stopped answering")

        class FreezingSource(StreamSource):
            async def pause(self):
                await trio.sleep(5)  # the stop never comes back, until the link is given up
                gone.set()
                raise LinkClosedError("QEMU link closed: QEMU stopped answering")

            async def resume(self):
                pass

        @rule.every(1.0)
        def tick(event, guest):
            guest.alert("info", "tick")

        @rule.on_breakpoint(0x1000)
        def hit(event, guest):
            guest.alert("warning", "hit")

        sink = ListSink("a")
        summary = await watch(FreezingSource(frozen(), capabilities={"breakpoints", "pause"}), ruleset(tick, hit), [sink])
        assert summary.end_reason == "QEMU stopped answering" and summary.source_ended
        assert [a.message for a in sink.alerts] == ["hit"]
        assert sink.events[-1].kind == "SourceEnded"

    async def test_stop_flushes_every_raised_alert(self, autojump_clock):
        """stop() (Ctrl-C) ends the watch; alerts still queued for a slow sink are delivered."""

        @rule.on_breakpoint(0x1000)
        def each(event, guest):
            guest.alert("critical", f"hit {event.seq}")

        slow = SlowSink(1.0)
        source = SyntheticSource(bps([0x1000] * 100_000), realtime=True, rate=1000)
        async with trio.open_nursery() as n:
            engine = await n.start(Engine(source, ruleset(each), [slow, ListSink()]).run)
            await trio.sleep(10)
            engine.stop()
        summary = engine.summary
        assert summary.end_reason == "stopped"
        raised = summary.alerts["critical"]
        assert raised >= 10 and len(slow.alerts) == raised and not summary.lost_alerts


class TestSinksAndStorms:
    async def test_slow_sink_drops_events_not_alerts(self, autojump_clock):
        """A sink slower than the event rate loses event records (counted), never alerts; queues stay bounded."""

        @rule.on(ProcessStart)
        def starts(event, guest):
            if event.pid % 100 == 0:
                guest.alert("warning", f"pid {event.pid}")

        events = [ProcessStart(seq=i, pid=i) for i in range(5000)]
        slow, fast = SlowSink(0.01), ListSink("fast")
        summary = await watch(SyntheticSource(events, batch=50), ruleset(starts),
                              [slow, fast], options=WatchOptions(sink_queue=256))
        assert len(slow.alerts) == len(fast.alerts) == 50 == summary.alerts["warning"]
        assert summary.dropped_records["slow"] > 0
        assert len(slow.events) + summary.dropped_records["slow"] == 5001
        assert len(fast.events) == 5001 and "fast" not in summary.dropped_records

    async def test_event_storm_drops_and_counts_but_loses_no_alert(self, autojump_clock):
        """A realtime storm faster than the pump: batches are dropped and counted, the watch goes on."""

        @rule.on_breakpoint(0x1000)
        def every_hundredth(event, guest):
            if event.seq % 100 == 0:
                guest.alert("warning", f"seq {event.seq}")

        sink = SlowSink(0.05)  # backpressure on alerts makes the pump lag behind the storm
        n = 60_000
        source = SyntheticSource(bps([0x1000] * n), realtime=True, rate=100_000, batch=100)
        summary = await watch(source, ruleset(every_hundredth), [sink],
                              options=WatchOptions(intake_queue=8, sink_queue=16,
                                                      budget=Budget(max_hits=10**9, max_cost=1.0)))
        assert summary.dropped_events > 0
        assert summary.events - 1 + summary.dropped_events == n  # -1: SourceEnded
        assert len(sink.alerts) == summary.alerts["warning"] > 0
        assert "Dropped" in {r.kind for r in sink.events}


class TestGovernance:
    async def test_hot_breakpoint_is_unhooked_then_rearmed(self, autojump_clock):
        """A trap over its hit budget is removed for a cooldown, reported, and armed again."""

        async def stream():
            for i in range(10_000):
                yield Breakpoint(seq=i, address=0x1000)
                if i % 100 == 99:
                    await trio.sleep(0.1)  # 1,000 hits/s

        class Hot(SyntheticSource):
            async def event_batches(self):
                async for event in stream():
                    if event.address in self.breakpoints:
                        yield [event]
                    else:
                        self.suppressed += 1
                        await trio.sleep(0)

        hits = []

        @rule.on_breakpoint(0x1000)
        def hot(event, guest):
            hits.append(event.seq)

        @rule.on(Demotion)
        def seen(event, guest):
            guest.alert("info", event.action)

        source = Hot([])
        sink = ListSink()
        summary = await watch(source, ruleset(hot, seen), [sink],
                              options=WatchOptions(budget=Budget(max_hits=300, cooldown=2.0)))
        assert summary.demotions, "the hot trap was never demoted"
        first = summary.demotions[0]
        assert first.trap == "breakpoint 0x1000" and first.action == "unhooked for 2s" and first.hits == 301
        assert ("remove_breakpoint", 0x1000) in source.arm_log
        assert source.arm_log.count(("add_breakpoint", 0x1000)) >= 2  # re-armed after the cooldown
        assert source.suppressed > 0 and len(hits) < 10_000
        assert [r.kind for r in sink.events].count("Demotion") == len(summary.demotions)
        assert sink.alerts[0].message == "unhooked for 2s"
        # repeated demotions back off: 2s, 4s, ...
        assert [d.action for d in summary.demotions[:2]] == ["unhooked for 2s", "unhooked for 4s"]

    async def test_trap_that_cannot_be_unhooked_is_sampled(self):
        """Without trap control (a replay), a hot trap is sampled 1/N and the skips are counted."""
        hits = []

        @rule.on_breakpoint(0x1000)
        def hot(event, guest):
            hits.append(event.seq)

        source = SyntheticSource(bps([0x1000] * 50_000), honour_traps=False)
        summary = await watch(source, ruleset(hot), [], options=WatchOptions(budget=Budget(max_hits=1000, window=3600)))
        assert summary.demotions and summary.demotions[0].action.startswith("sampled 1/")
        assert summary.sampled_out > 0 and len(hits) + summary.sampled_out == 50_000


class TestTicks:
    async def test_every_and_on_start(self, autojump_clock):
        """Periodic rules run on schedule (guest paused), start rules once, with per-run state and config."""
        seen = []

        @rule.on_start
        @rule.configure(label="x")
        def start(event, guest):
            guest.state["n"] = 0
            seen.append(("start", guest.config["label"], type(event)))

        @rule.every(1.0)
        def tick(event, guest):
            seen.append(("tick", trio.current_time()))

        async def forever():
            await trio.sleep_forever()
            yield  # pragma: no cover

        rs = ruleset(start, tick)
        rs.configure("t.start", label="y")
        t0 = trio.current_time()
        summary = await Engine(StreamSource(forever()), rs, []).run(duration=5.5)
        assert seen[0] == ("start", "y", Tick)
        assert [round(t - t0, 3) for _, t in seen[1:]] == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert summary.end_reason == "duration elapsed"


class TestWatchpoints:
    async def test_write_listener_arms_a_watchpoint(self):
        """``on_write`` arms a write watchpoint of the declared size and dispatches by range start."""
        got = []

        @rule.on_write(0x8000, 16)
        def written(event, guest):
            got.append(event.address)

        source = SyntheticSource([MemoryAccess(seq=1, access=Access.WRITE, address=0x8000, size=8)])
        await watch(source, ruleset(written), [])
        assert got == [0x8000] and ("add_watchpoint", 0x8000) in source.arm_log
        assert ("remove_watchpoint", 0x8000) in source.arm_log  # removed at the end
