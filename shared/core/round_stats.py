"""Per-round measurements as plain data; aggregation lives with whoever reports them.

The in-process engine returns these, the draft service publishes them as telemetry events, and the
telemetry service rolls them up: one definition of what a round cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RoundStats:
    round: int
    drafted: int  # draft tokens sent for verification (gamma actually used)
    accepted: int  # of those, accepted by the target
    emitted: int  # tokens committed by the round (accepted + correction/bonus, cut at EOS / max)
    uplink_bytes: int  # encoded device -> edge payload
    downlink_bytes: int  # encoded edge -> device payload
    draft_s: float  # device compute
    verify_s: float  # edge compute (target forward + verification)
    round_s: float  # wall time of the whole round as the device saw it
    gamma: int = 0  # the draft length the policy chose (drafted may be less: EOS, confidence stop, the end)
    prefetched: int = 0  # draft tokens reused from the previous round's pipelined drafting

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    """The per-request summary every result carries (CLI `--json`, NATS replies, benchmarks)."""

    mode: str
    gamma: int
    k: int
    policy: str = "fixed"
    pipeline: bool = False
    rounds: list[RoundStats] = field(default_factory=list)
    wall_s: float = 0.0
    new_tokens: int = 0

    def summary(self) -> dict:
        r = self.rounds
        drafted = sum(x.drafted for x in r)
        accepted = sum(x.accepted for x in r)
        up, down = sum(x.uplink_bytes for x in r), sum(x.downlink_bytes for x in r)
        n = max(self.new_tokens, 1)
        spec_rounds = [x for x in r if x.drafted]
        rejections = sum(1 for x in r if x.accepted < x.drafted)
        return {
            "mode": self.mode,
            "gamma": self.gamma,
            "k": self.k,
            "policy": self.policy,
            "pipeline": self.pipeline,
            "mean_gamma": sum(x.gamma for x in spec_rounds) / len(spec_rounds) if spec_rounds else 0.0,
            # per-token acceptance alpha (censored geometric): what the speedup model S(gamma) takes
            "token_acceptance": accepted / (accepted + rejections) if accepted + rejections else 0.0,
            "rejections": rejections,
            "prefetched": sum(x.prefetched for x in r),
            "rounds": len(r),
            "new_tokens": self.new_tokens,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_per_round": accepted / len(r) if r else 0.0,
            "mean_tokens_per_round": self.new_tokens / len(r) if r else 0.0,
            "uplink_bytes": up,
            "downlink_bytes": down,
            "uplink_bytes_per_token": up / n,
            "downlink_bytes_per_token": down / n,
            "draft_s": sum(x.draft_s for x in r),
            "verify_s": sum(x.verify_s for x in r),
            "wall_s": self.wall_s,
            "tokens_per_s": self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0,
        }
