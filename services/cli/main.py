"""`draftwire` command line: generate (in-process or over NATS), models, and the service stack.

Flags are shared between subcommands through small argument-group builders so `generate`, `up` and `bench`
accept the same model and sampling flags with the same names.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from draftwire.shared.bench import DEFAULT_SET, PROMPTS_HELP
from draftwire.shared.core.params import (
    DEFAULT_GAMMA,
    DEFAULT_K,
    DEFAULT_QUANT,
    MODES,
    POLICIES,
    QUANTS,
    ParamError,
    SamplingParams,
    SpecParams,
)
from draftwire.shared.io.help_format import HelpParser
from draftwire.shared.models.cache import cache_root

DEFAULT_DRAFT = ("smollm2-135m", "int8")
DEFAULT_TARGET = ("smollm2-135m", "fp32")
DTYPES = ("fp32", "bf16", "int8")
DEVICES = ("cpu", "cuda", "auto")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--draft-model", default=DEFAULT_DRAFT[0], help="catalog name, HF dir, .gguf file or hub id")
    g.add_argument("--draft-dtype", default=DEFAULT_DRAFT[1], choices=DTYPES,
                   help="the draft's weights (int8: dynamically quantized linear layers)")
    g.add_argument("--target-model", default=DEFAULT_TARGET[0], help="catalog name, HF dir, .gguf file or hub id")
    g.add_argument("--target-dtype", default=DEFAULT_TARGET[1], choices=DTYPES, help="the target's weights")
    for role in ("draft", "target"):
        key = f"DRAFTWIRE_{role.upper()}_DEVICE"
        g.add_argument(f"--{role}-device", default=os.environ.get(key, "cpu"), choices=DEVICES,
                       help=f"where the {role} model runs; auto = cuda when torch sees one (int8: cpu) [{key}]")


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--mode", default="tkslt", choices=MODES,
                   help="ar = target alone; full = whole draft distributions; tkslt = top-K of them; "
                        "dssd = split verification")
    g.add_argument("--gamma", type=int, default=DEFAULT_GAMMA, help="draft tokens per round (adaptive: the first round's)")
    g.add_argument("--policy", default="fixed", choices=POLICIES,
                   help="draft length: fixed gamma; adaptive (gamma* re-chosen every round); confidence stop")
    g.add_argument("--confidence", type=float, default=0.5,
                   help="policy confidence: stop drafting below this draft top probability")
    g.add_argument("--pipeline", action="store_true", help="keep drafting while a round is verified (PEARL)")
    g.add_argument("--k", type=int, default=DEFAULT_K, help="top-K entries sent per draft position (tkslt)")
    g.add_argument("--quant", default=DEFAULT_QUANT, choices=QUANTS, help="wire quantization of probabilities")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this (1 = all)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, reported)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    g.add_argument("--min-new-tokens", type=int, default=0, help="mask end-of-sequence until this many tokens")


def local_only_flags(args: argparse.Namespace) -> list[str]:
    """The flags given on the command line that a request over NATS cannot carry."""
    defaults = build_parser().parse_args(["generate", "x"])
    names = ("draft_model", "draft_dtype", "target_model", "target_dtype", "draft_device", "target_device", "quant")
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) != getattr(defaults, n, None)]


def params_from_args(args: argparse.Namespace) -> tuple[SamplingParams, SpecParams]:
    seed = args.seed if args.seed is not None else secrets.randbelow(2**63)
    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        seed=seed,
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
    )
    return sampling, SpecParams(
        mode=args.mode, gamma=args.gamma, k=args.k, quant=args.quant, policy=args.policy,
        confidence=args.confidence, pipeline=args.pipeline,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    sampling, spec = params_from_args(args)
    if args.link is not None and not args.local:
        raise ParamError("--link shapes the device-edge link of the stack: pass it to `draftwire up` "
                         "(or use `generate --local --link ...` to emulate it in-process)")
    if not args.local:
        from draftwire.services.cli.remote import generate_remote

        if ignored := local_only_flags(args):  # the stack's services chose these when they started
            raise ParamError(f"{', '.join(ignored)} only apply with --local (the running stack's services "
                             "chose their models and wire quantization when they started)")

        return generate_remote(args, sampling, spec)
    from draftwire.shared.core.speculation import LocalEngine
    from draftwire.shared.models.runtime import load_model

    target = load_model(args.target_model, args.target_dtype, device=args.target_device)
    draft = load_model(args.draft_model, args.draft_dtype, device=args.draft_device) if spec.mode != "ar" else None
    result = LocalEngine(target, draft).generate(args.prompt, sampling, spec, link=args.link)
    if args.json:
        out = result.to_dict()
        out["stats"]["seed"] = sampling.seed
        print(json.dumps(out))
    else:
        print(result.text)
        s = result.stats.summary()
        print(
            f"[{s['mode']}] {s['new_tokens']} tokens in {s['wall_s']:.2f}s ({s['tokens_per_s']:.1f} tok/s), "
            f"acceptance {s['acceptance_rate']:.2f}, {s['mean_tokens_per_round']:.2f} tokens/round, "
            f"uplink {s['uplink_bytes_per_token']:.0f} B/token, finish={result.finish_reason}",
            file=sys.stderr,
        )
    return 0


def add_client_identity_flags(p: argparse.ArgumentParser) -> None:
    """A client's identity on a secured stack: its credentials (its tenant is the file's name) and TLS."""
    from draftwire.shared.io.service_shell import add_tls_flags

    g = p.add_argument_group("identity (secured stacks)")
    g.add_argument("--creds", default=None, help="your nkey seed file (`draftwire up --secure DIR` writes "
                   "DIR/client.nk; `draftwire auth add-client NAME --secure DIR` another)")
    add_tls_flags(g)


def add_secure_flag(g, default: str | None = None) -> None:
    g.add_argument("--secure", metavar="DIR", default=default,
                   help="per-role NATS identities, permissions and TLS: credentials and certificates are "
                        "created in DIR (or reused) and each service gets its own")


def cmd_auth_init(args: argparse.Namespace) -> int:
    """Identities and TLS certificates for a secured deployment (compose's `keys` service runs this)."""
    from draftwire.shared.io import credentials
    from draftwire.shared.io.tls import DEFAULT_HOSTS, make_dev_certs

    d = credentials.ensure_credentials(args.dir)
    tls = make_dev_certs(d / "tls", (*DEFAULT_HOSTS, *args.host))
    roles = json.loads((d / "roles.json").read_text())
    for name, role in sorted(roles.items()):
        print(f"{role:<10} {d / (name + '.nk')}")
    print(f"server     {d / 'auth.conf'} (nats-server `authorization` block), {tls.cert} + {tls.key} (TLS)")
    print(f"clients    trust {tls.ca} (DRAFTWIRE_TLS_CA); each service signs in with its own .nk (DRAFTWIRE_CREDS)")
    return 0


def cmd_auth(args: argparse.Namespace) -> int:
    from draftwire.shared.io import credentials

    role = "client" if args.auth_cmd == "add-client" else "device"
    try:
        path = credentials.add_identity(args.secure, args.name, role)
    except ValueError as exc:
        print(f"draftwire auth: error: {exc}", file=sys.stderr)
        return 2
    what = (f"its tenant subjects: draftwire.prompts.{args.name}, draftwire.results.{args.name}.<id>, "
            f"draftwire.stream.{args.name}.<id>" if role == "client" else
            f"a draft service started with --creds {path} takes jobs under draftwire.dev.{args.name}")
    print(f"{role} {args.name}: {path} ({what}); a running `draftwire up --secure {args.secure}` admits it "
          "within a second")
    return 0


def add_stack_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stack")
    add_secure_flag(g)
    g.add_argument("--nats", default=None, help="use these NATS servers (URL1,URL2,... of one cluster) instead of "
                   "starting embedded ones")
    g.add_argument("--nats-port", type=int, default=4222,
                   help="port of the embedded NATS server, whose JetStream state (queued prompts) is kept per port for "
                   "the next start (0 = any port, state kept only while it runs); a cluster's nodes take it and the "
                   "next ones")
    g.add_argument("--nats-cluster", type=_positive, default=None, metavar="N",
                   help="start a local cluster of N nats-servers (3: any one may die) instead of one; every "
                        "stream and bucket gets min(3, N) replicas")
    g.add_argument("--telemetry-port", type=int, default=9464, help="HTTP port of /metrics (0 = any)")
    g.add_argument("--gateway-port", type=int, default=8000,
                   help="HTTP port of the OpenAI-compatible API (8000, as vLLM's; 0 = any)")
    for flag, what in (("verifiers", "verifier"), ("drafts", "draft"), ("schedulers", "scheduler")):
        g.add_argument(f"--{flag}", type=_positive, default=1, help=f"{what} instances to start")
    add_link_flag(g)
    g.add_argument("--leaf", action="store_true",
                   help="run the draft services on a device site's own nats-server, a leaf node of the edge "
                        "(docs/scale_out.md); --link then shapes the leaf link")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_link_flag(g) -> None:
    g.add_argument("--link", type=_link, default=None,
                   help="emulate the device-edge link: a profile (lan, 5g, cell-edge) and/or "
                        "up=RATE,down=RATE,rtt=TIME[,jitter=TIME][,outage=TIME/PERIOD], e.g. cell-edge,rtt=80ms")


def _link(text: str):
    from draftwire.shared.core.link_profile import LinkError, parse_link

    try:
        return parse_link(text)
    except LinkError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_up(args: argparse.Namespace) -> int:
    import asyncio

    from draftwire.services.cli.stack import run_up

    params_from_args(args)  # validate the scheduler defaults before starting anything
    return asyncio.run(run_up(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from draftwire.services.cli.remote import run_demo

    params_from_args(args)
    return run_demo(args)


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from draftwire.services.cli.selfcheck import cmd_selfcheck as run

    return run(args)


def cmd_overhead(args: argparse.Namespace) -> int:
    from draftwire.services.cli.overhead import cmd_overhead as run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from draftwire.services.cli.bench import cmd_bench as run

    return run(args)


def cmd_models(args: argparse.Namespace) -> int:
    from draftwire.shared.models import store

    if args.models_cmd == "pull":
        for name in args.names:
            path = store.pull(name, progress=True)
            print(f"{name}: {path}")
        return 0
    rows = store.list_models()
    for r in rows:
        print(f"{r['name']:<22} {'cached' if r.get('cached') else '-':<7} {r.get('description', '')}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("draftwire")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = HelpParser(prog="draftwire", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"draftwire {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt", help="the prompt text (a raw completion)")
    gen.add_argument("--local", action="store_true", help="run in-process instead of through the NATS services")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids, stats")
    gen.add_argument("--nats", default=None, help="NATS URL of a running stack, or URL1,URL2,... of its cluster's "
                     "nodes (default nats://127.0.0.1:4222)")
    add_client_identity_flags(gen)
    gen.add_argument("--timeout", type=float, default=600.0,
                     help="seconds to wait for the result, sent as the request's timeout_s (its deadline); "
                     "Ctrl-C cancels the request")
    add_link_flag(gen)
    add_model_flags(gen)
    add_generation_flags(gen)
    gen.set_defaults(func=cmd_generate)

    up = sub.add_parser("up", help="start NATS (embedded unless --nats) and the services (scheduler, draft, verifier, telemetry, gateway)")
    add_stack_flags(up)
    add_model_flags(up)
    add_generation_flags(up)
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="bring the stack up, run bench prompts per mode, print a summary")
    add_model_flags(demo)
    add_generation_flags(demo)
    demo.add_argument("--modes", default="ar,full,tkslt", help="comma-separated modes to compare")
    demo.add_argument("--num-prompts", type=int, default=3, help="the first this many prompts of the set")
    demo.add_argument("--prompts", default=DEFAULT_SET, help=PROMPTS_HELP)
    demo.add_argument("--verbose", action="store_true", help="show the services' logs")
    add_secure_flag(demo, default=str(Path(cache_root()) / "secure"))
    demo.add_argument("--insecure", dest="secure", action="store_const", const=None,
                      help="no authentication or TLS (local development only)")
    add_link_flag(demo)
    demo.set_defaults(func=cmd_demo, nats=None, nats_port=0, telemetry_port=0, max_new_tokens=48)

    auth = sub.add_parser("auth", help="manage the identities of a secured stack")
    auth_sub = auth.add_subparsers(dest="auth_cmd", required=True)
    init = auth_sub.add_parser("init", help="create (or reuse) every role's identity and dev TLS certs in DIR")
    init.add_argument("dir", type=Path, help="where the identities and certificates go")
    init.add_argument("--host", action="append", default=[], metavar="H",
                      help="another name the NATS server is reached by (127.0.0.1, localhost and nats always are)")
    init.set_defaults(func=cmd_auth_init)
    for verb, what in (("add-client", "a client identity (a tenant)"), ("add-device", "a device identity")):
        add = auth_sub.add_parser(verb, help=f"add {what} as DIR/NAME.nk")
        add.add_argument("name", help="the identity's name (a client's is its tenant)")
        add.add_argument("--secure", metavar="DIR", required=True, help="the directory `up --secure` uses")
        add.set_defaults(func=cmd_auth)

    check = sub.add_parser("selfcheck", help="greedy speculative output vs the target's transformers generate")
    add_model_flags(check)
    check.add_argument("--draft-dtypes", default="int8,bf16", help="comma-separated draft dtypes to check")
    check.add_argument("--modes", default="full,tkslt", help="comma-separated modes to check")
    check.add_argument("--gamma", type=int, default=DEFAULT_GAMMA, help="draft tokens per round")
    check.add_argument("--k", type=int, default=DEFAULT_K, help="top-K entries sent per draft position (tkslt)")
    check.add_argument("--max-new-tokens", type=int, default=48, help="every prompt makes exactly this many tokens")
    check.add_argument("--num-prompts", type=int, default=1000, help="the first this many prompts of the set")
    check.add_argument("--prompts", default=DEFAULT_SET, help=PROMPTS_HELP)
    check.add_argument("--out", default=None, help="write the JSON report here")
    check.set_defaults(func=cmd_selfcheck)

    over = sub.add_parser("overhead", help="benchmark: NATS + codec cost of one round on loopback (p50/p99)")
    over.add_argument("--rounds", type=int, default=2000, help="rounds timed per K")
    over.add_argument("--gamma", type=int, default=DEFAULT_GAMMA, help="draft positions per round")
    over.add_argument("--k-values", type=lambda s: [int(x) for x in s.split(",")], default=[8, 256, 49152],
                      help="comma-separated K values (K = vocab is the full mode)")
    over.add_argument("--vocab", type=int, default=49152, help="vocabulary size of the synthetic distributions")
    over.add_argument("--out", default="bench-out/overhead", help="output directory")
    over.set_defaults(func=cmd_overhead)

    bench = sub.add_parser("bench", help="benchmark: modes x links x draft-length policies through the services")
    add_model_flags(bench)
    bench.add_argument("--pair", default=None,
                       help="comma-separated model pairs measured in turn in one run: smollm2 (int8 -> fp32), "
                            "qwen (int8 -> bf16), smollm2-qwen (SmolLM2 int8 -> Qwen bf16, another tokenizer), "
                            "gemma3-qwen (Gemma 3 int8 -> Qwen bf16); unset: the model flags")
    bench.add_argument("--modes", default="ar,full,tkslt,dssd", help="comma-separated modes to run")
    bench.add_argument("--links", default="lan,5g,cell-edge",
                       help="profile names, or ';'-separated --link specs (e.g. 'cell-edge;up=1M,down=5M,rtt=80ms')")
    bench.add_argument("--policies", default="fixed,adaptive,pipelined",
                       help="fixed, sweep, analytic, adaptive, confidence, pipelined, adaptive+pipelined")
    bench.add_argument("--gamma", type=int, default=DEFAULT_GAMMA, help="the fixed gamma (and adaptive's first)")
    bench.add_argument("--gammas", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3, 4, 6, 8],
                       help="gammas of the sweep policy")
    bench.add_argument("--k", type=int, default=DEFAULT_K, help="top-K entries sent per draft position (tkslt)")
    bench.add_argument("--confidence", type=float, default=0.5,
                       help="the confidence policy's stop: draft top probability below this")
    bench.add_argument("--max-prompts", type=int, default=4, help="the first this many prompts of the set")
    bench.add_argument("--max-new-tokens", type=int, default=32, help="every prompt makes exactly this many tokens")
    bench.add_argument("--prompts", default=DEFAULT_SET, help=PROMPTS_HELP)
    bench.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    bench.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                       help="also run transformers' generate(assistant_model=...) on the same pair (universal assisted "
                            "generation when the tokenizers differ)")
    bench.add_argument("--out", default="bench-out/bench", help="output directory")
    bench.add_argument("--verbose", action="store_true", help="show the services' logs")
    bench.set_defaults(func=cmd_bench, nats=None, nats_port=0, telemetry_port=0, mode="tkslt", policy="fixed",
                       pipeline=False)

    from draftwire.services.cli import certs, drain, faults, loadtest

    certs.add_parser(sub)
    drain.add_parser(sub)
    faults.add_parser(sub, add_model_flags)
    loadtest.add_parser(sub, add_model_flags)

    models = sub.add_parser("models", help="list or pull the model catalog")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="catalog names and whether they are cached")
    pull = msub.add_parser("pull", help="download and convert catalog models into the cache")
    pull.add_argument("names", nargs="+")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from draftwire.shared.models.errors import ModelError

    try:
        return args.func(args)
    except (ParamError, ModelError, ValueError, ConnectionError, RuntimeError) as exc:
        print(f"draftwire: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
