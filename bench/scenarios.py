"""The scenarios of ``bench overhead``: what each runs, at full size or scaled down.

Full size follows the issue: ``latency`` (1 stream, 200 frames 2 ms apart),
``throughput-1`` and ``throughput-16`` (frames as fast as the emulator can
write), ``concurrency-500`` (100 frames 20 ms apart) and ``concurrency-200``
(10 ms apart), ``idle`` (1,000 streams whose upstream holds after the first
frame). ``--quick`` and the ``--frames/--streams/--idle-streams`` overrides
scale them down; the keys stay the same, the labels say what actually ran.

``burst`` is *optional* too: one stream whose upstream sends 200 frames in
one write (``burst-200``), and one of 2,000 frames at full speed
(``burst-2000``); its figure is time to first token, where a relay that
decodes a whole read before writing any of it falls behind the floor.

``long`` is *optional*: it runs only when ``--scenario`` names it, never in
the default set. It is one stream of stamped frames at full speed, as many
as make an answer of :data:`LONG_ANSWER_CHARS` characters (a stamp is
``[ts:<monotonic ns>]``, 17-20 characters depending on the uptime; the
count is worked out from the clock when the scenarios are built), and is
reported per
quarter of the stream (:attr:`Scenario.quarters`): with ChatGLM every
snapshot repeats the whole answer so far, so the cost of a chunk grows with
the length of the answer, and the first and last quarters show by how much.

``sustained`` is the public gateway benchmarks' "sustained streams" figure:
streams of :data:`SUSTAINED_FRAMES` content deltas
:data:`SUSTAINED_FRAME_DELAY_S` apart, run at 1, 2, 4, ... concurrent
streams (:attr:`Scenario.levels`, up to :data:`SUSTAINED_CAP`) until a level
fails. A level is sustained when every frame of every stream arrives and no
gap between two frames of one stream exceeds :data:`SUSTAINED_MAX_GAP_MS`
(:func:`bench.sustained.judge_level`). Each level is a scenario of its own
(:meth:`Scenario.at_level`): its emulator holds the first frame until every
stream is set up, as in ``concurrency``, so a level measures steady
streaming, not the connection storm. ``--quick`` caps it at
:data:`SUSTAINED_QUICK_CAP`, ``--streams`` at that count, ``--frames``
changes the frames per stream.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from bench.upstreams import EmulatorParams
from protocol.errors import RequestError

#: Scenario groups, in the order they run.
GROUPS = ("latency", "throughput", "concurrency", "idle", "sustained", "burst", "long")
#: Groups that run only when ``--scenario`` names them.
OPTIONAL_GROUPS = ("burst", "long")
#: The answer length of the ``long`` scenario (``--quick``: half of it).
LONG_ANSWER_CHARS = 20_000

#: Sustained streams: content deltas per stream, their spacing, the largest
#: gap a sustained level may show, the last level tried (full and ``--quick``).
SUSTAINED_FRAMES = 64
SUSTAINED_FRAME_DELAY_S = 0.020
SUSTAINED_MAX_GAP_MS = 40.0
SUSTAINED_CAP = 2_048
SUSTAINED_QUICK_CAP = 64

#: Base bound of one run, on top of its streaming time.
RUN_SLACK_S = 30.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """One scenario: its key, how many streams, what the emulator sends."""

    key: str
    group: str
    streams: int
    params: EmulatorParams
    idle: bool = False
    optional: bool = False
    quarters: bool = False
    levels: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """A short human description of the actual parameters."""
        p = self.params
        noun = "stream" if self.streams == 1 else "streams"
        if self.levels:
            return (
                f"{'/'.join(map(str, self.levels))} streams x {p.frames} frames,"
                f" {p.frame_delay_s * 1000:g} ms apart, until a level fails"
            )
        if self.idle:
            return f"{self.streams} open {noun}, upstream holds after frame 1"
        if p.pack_all:
            pace = "all in one write"
        else:
            pace = f"{p.frame_delay_s * 1000:g} ms apart" if p.frame_delay_s else "full speed"
        return f"{self.streams} {noun} x {p.frames} frames, {pace}"

    @property
    def start_spacing_s(self) -> float:
        """Delay between the starts of two streams of a paced scenario.

        The starts are spread evenly over one frame interval, so that the
        streams' frames are spread over it too, in both modes alike, as
        independent clients' would be. Started all at once, direct streams
        (set up in microseconds) would tick in lockstep and queue behind
        each other in the client, while relayed ones (set up in
        milliseconds) would not: the floor would be higher than the relay.
        """
        if self.idle or self.streams < 2 or not self.params.frame_delay_s:
            return 0.0
        return self.params.frame_delay_s / self.streams

    @property
    def frames_per_stream(self) -> int:
        """Stamped frames each stream must deliver in this scenario."""
        return 1 if self.idle else self.params.frames

    def at_level(self, streams: int, first_delay_s: float | None = None) -> Scenario:
        """One level of a ``levels`` scenario: a plain paced scenario of ``streams`` streams.

        Args:
            streams: the concurrency of this level.
            first_delay_s: the emulator's delay before frame 1 (default: 0.5 s
                plus 4 ms per stream, so that every stream is set up first).
        """
        if first_delay_s is None:
            first_delay_s = _first_delay(streams)
        return replace(
            self,
            key=f"{self.key}-{streams}",
            streams=streams,
            params=replace(self.params, first_delay_s=first_delay_s),
            levels=(),
        )

    @property
    def bound_s(self) -> float:
        """Upper bound of one run (and of each of its streams)."""
        p = self.params
        streaming = p.first_delay_s + p.frames * p.frame_delay_s
        return RUN_SLACK_S + 3 * streaming + 0.05 * self.streams


def scenarios(
    *,
    quick: bool = False,
    frames: int | None = None,
    streams: int | None = None,
    idle_streams: int | None = None,
    first_delay_s: float | None = None,
    optional: bool = False,
) -> list[Scenario]:
    """Every scenario, full size or ``quick``, with optional overrides.

    Args:
        quick: small counts (50 frames, 50 streams, 100 idle streams).
        frames: frames per stream in every streaming scenario.
        streams: streams in every multi-stream scenario.
        idle_streams: open streams of the idle scenario.
        first_delay_s: the emulator's delay before the first frame of the
            paced scenarios (default: 0.5 s plus 4 ms per stream).
        optional: add the optional scenarios (``long``) at the end.
    """
    if quick:
        lat, tp1, tp16, c500, c200, idle_n, many = 50, 2_000, 200, 50, 50, 100, 50
        long_frames = _frames_for(LONG_ANSWER_CHARS // 2)
    else:
        lat, tp1, tp16, c500, c200, idle_n, many = 200, 20_000, 2_000, 100, 100, 1_000, 0
        long_frames = _frames_for(LONG_ANSWER_CHARS)

    def fr(default: int) -> int:
        return frames if frames is not None else default

    def st(default: int) -> int:
        return streams if streams is not None else (min(default, many) if many else default)

    def first(n: int) -> float:
        return first_delay_s if first_delay_s is not None else _first_delay(n)

    n500, n200 = st(500), st(200)
    cap = streams if streams is not None else (SUSTAINED_QUICK_CAP if quick else SUSTAINED_CAP)
    levels = tuple(2**i for i in range(max(1, cap).bit_length()))
    sustained = Scenario(
        "sustained",
        "sustained",
        levels[-1],
        EmulatorParams(fr(SUSTAINED_FRAMES), SUSTAINED_FRAME_DELAY_S, first(levels[-1])),
        levels=levels,
    )
    extra = [
        Scenario(
            "long",
            "long",
            1,
            EmulatorParams(fr(long_frames)),
            optional=True,
            quarters=True,
        )
    ]
    burst = [
        Scenario("burst-200", "burst", 1, EmulatorParams(fr(200), pack_all=True), optional=True),
        Scenario("burst-2000", "burst", 1, EmulatorParams(fr(2_000)), optional=True),
    ]
    return [
        Scenario("latency", "latency", 1, EmulatorParams(fr(lat), 0.002)),
        Scenario("throughput-1", "throughput", 1, EmulatorParams(fr(tp1))),
        Scenario("throughput-16", "throughput", st(16), EmulatorParams(fr(tp16))),
        Scenario(
            "concurrency-500", "concurrency", n500, EmulatorParams(fr(c500), 0.020, first(n500))
        ),
        Scenario(
            "concurrency-200", "concurrency", n200, EmulatorParams(fr(c200), 0.010, first(n200))
        ),
        Scenario(
            "idle",
            "idle",
            idle_streams if idle_streams is not None else idle_n,
            EmulatorParams(frames=2, stall_after=1),
            idle=True,
        ),
        sustained,
        *(burst + extra if optional else []),
    ]


def select(all_scenarios: list[Scenario], names: str | None) -> list[Scenario]:
    """The scenarios a ``--scenario`` list names (keys or groups).

    Without names: every scenario that is not optional.

    Raises:
        RequestError: an unknown name.
    """
    if not names:
        return [s for s in all_scenarios if not s.optional]
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    known = {s.key for s in all_scenarios} | {s.group for s in all_scenarios}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise RequestError(
            f"unknown scenario {unknown[0]!r}; choose from {', '.join(sorted(known))}",
            param="scenario",
        )
    return [s for s in all_scenarios if s.key in wanted or s.group in wanted]


def _first_delay(streams: int) -> float:
    """The emulator's delay before frame 1 that lets ``streams`` streams be set up first."""
    return round(0.5 + 0.004 * streams, 3)


def _frames_for(chars: int) -> int:
    """How many stamped frames make an answer of at least ``chars`` characters."""
    return math.ceil(chars / len(f"[ts:{time.monotonic_ns()}]"))
