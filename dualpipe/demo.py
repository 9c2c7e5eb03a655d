"""``python -m dualpipe demo`` (filled in with the runtime)."""


def add_arguments(p):
    p.add_argument("--ranks", type=int, default=4)


def run(args) -> int:
    raise ValueError("the demo needs the runtime, which is not built yet")
