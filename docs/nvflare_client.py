"""Template: one site's NVIDIA FLARE client (Client API) around mmdx's federated hooks.

Not run by mmdx's tests, and NVFlare is no dependency of mmdx: install it beside mmdx at each site
(`pip install nvflare`) and adapt. docs/federated.md describes the protocol this client speaks and the
server-side controller it expects; it is the one `mmdx federate` runs with Flower (multimodal.federation):

    task meta {"mmdx": "statistics"}          → meta {"statistics": JSON}      preprocessing counts
    task meta {"mmdx": "agree", "prep": JSON,
               "total_epochs": N}             → meta {"class_counts": JSON}    the agreed preprocessing
    train task, params = global weights,
      meta {"local_epochs", "class_balance",
            "proximal_mu" (FedProx, optional)} → params = local weights, meta NUM_STEPS_CURRENT_ROUND
    validate task, params = global weights     → metrics {"num-examples", "histogram"}

Only weights and the counts of multimodal.training.site_counts leave the site; the records file named
on the command line is read here and nowhere else.

    python nvflare_client.py CONFIG.yaml RECORDS.csv     (as the job's train script, at each site)
"""
import json
import sys

import nvflare.client as flare

from multimodal.config import load_config
from multimodal.data.preprocess import Preprocessing
from multimodal.data.records import load_records
from multimodal.training.federated import Site


def main(config_path: str, records_path: str) -> None:
    flare.init()
    cfg = load_config(config_path)
    site = Site(cfg, load_records(records_path, cfg, labels=True))  # split into training and hold-out here
    while flare.is_running():
        task = flare.receive()
        step = (task.meta or {}).get("mmdx")
        if step == "statistics":
            flare.send(flare.FLModel(params={}, meta={"statistics": json.dumps(site.statistics())}))
        elif step == "agree":
            agreed = json.loads(task.meta["prep"])
            prep = Preprocessing.from_state(cfg, agreed["state"], agreed["tokenizer"])
            counts = site.agree(prep, total_epochs=int(task.meta["total_epochs"]))
            flare.send(flare.FLModel(params={}, meta={"class_counts": json.dumps(counts)}))
        elif flare.is_evaluate():
            site.set_state(task.params)
            flare.send(flare.FLModel(metrics=site.evaluate_site()))
        elif flare.is_train():
            site.set_state(task.params)
            steps = int(task.meta["local_epochs"]) * site.steps_per_epoch
            out = site.train_steps(steps, list(task.meta["class_balance"]), float(task.meta.get("proximal_mu", 0.0)))
            flare.send(flare.FLModel(params=site.get_state(), metrics={"train_loss": out["train-loss"]},
                                     meta={"NUM_STEPS_CURRENT_ROUND": out["num-examples"]}))
        else:  # submit_model and other tasks: nothing of this site's to hand over beyond its weights
            flare.send(flare.FLModel(params=site.get_state()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
