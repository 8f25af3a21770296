"""`ckpt migrate --plot FILE`: dirty pages and bytes sent per round, as a picture.

matplotlib is optional (`pip install ckpt[plot]`); without it --plot is one clear error,
raised before the migration starts.
"""

from __future__ import annotations

from typing import Any

from ckpt.errors import CkptError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CkptError("--plot needs matplotlib: pip install 'ckpt[plot]'") from None


def plot_rounds(rounds: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["round"] for r in rounds]
    fig, left = plt.subplots(figsize=(7, 4))
    left.bar(n, [r["dirty_pages"] for r in rounds], color="tab:blue", alpha=0.7)
    left.set_xticks(n)
    left.set_xlabel("round (the last one is the frozen final pass)")
    left.set_ylabel("dirty pages", color="tab:blue")
    left.set_yscale("log")
    right = left.twinx()
    right.plot(n, [r["bytes"] / 2**20 for r in rounds], color="tab:red", marker="o")
    right.set_ylabel("MiB sent", color="tab:red")
    left.set_title(title)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise CkptError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
