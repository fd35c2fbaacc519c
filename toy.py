"""Train an attention-only toy transformer, then score its heads (Seed 003).

    python toy.py                          # 2 layers on the bundled corpus (conf/toy.yaml)
    python toy.py toy.layers=1             # the 1-layer model
    python toy.py data=openwebtext         # OpenWebText, streamed (needs network)
    python toy.py --help                   # every key

Keys: clt/config.py (ToyConfig). Writes toy.out/ (model/, heads/, history.jsonl, history.png).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from clt.config import ToyJobConfig, load_config
from clt.errors import command


@command
def run(cfg: DictConfig) -> None:
    from clt.circuits.toy import train_toy

    out = train_toy(load_config(cfg, ToyJobConfig))
    print(f"wrote {out}/ (model/, heads/, history.jsonl, history.png); next: clt heads {out}/model")


@hydra.main(version_base=None, config_path="conf", config_name="toy")
def main(cfg: DictConfig) -> None:
    if code := run(cfg):
        sys.exit(code)


if __name__ == "__main__":
    main()
