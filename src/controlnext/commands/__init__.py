"""One module per `controlnext` subcommand; each exposes `register(subparsers)`."""


def add_sampling_options(p) -> None:
    """Options shared by the commands that sample the small shipped models (`demo`, `eval`)."""
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of results")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these models are tiny, and extra threads only add overhead)",
    )
