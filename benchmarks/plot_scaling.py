"""Plot how S1 and S4 grow with the number of files, ours against rsync (benchmarks/scaling.json).

    python -m benchmarks.plot_scaling            # writes benchmarks/scaling.png (needs matplotlib)
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(HERE, "scaling.json")) as f:
        data = json.load(f)
    series = {name: value for name, value in data.items() if isinstance(value, dict)}
    fig, (seconds, ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, s in series.items():
        line = seconds.plot(s["files"], s["ours"], marker="o", label=f"{name.split(',')[0]}: mirror")[0]
        seconds.plot(s["files"], s["peer"], marker="s", linestyle="--", color=line.get_color(),
                     label=f"{name.split(',')[0]}: rsync")  # fmt: skip
        ratio.plot(s["files"], [o / p for o, p in zip(s["ours"], s["peer"], strict=True)], marker="o",
                   color=line.get_color(), label=name)  # fmt: skip
    seconds.set(xscale="log", yscale="log", xlabel="files in the tree", ylabel="seconds (median)",
                title="time")  # fmt: skip
    ratio.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ratio.set(xscale="log", xlabel="files in the tree", ylabel="mirror / rsync", ylim=(0, 1),
              title="ratio (goal: at most 0.5)")  # fmt: skip
    seconds.legend(fontsize=7)
    ratio.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(HERE, "scaling.png")
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
