"""`mmdx federate`: one model trained across sites whose records never meet, with Flower.

Each site is a Flower client over its own records file; the server (Flower's ServerApp) agrees the
preprocessing from the sites' counts, then runs FedAvg (or FedProx, optionally with Flower's
server-side differential-privacy clipping) for a number of rounds, and the result is written as one
ordinary model directory that predict, explain and evaluate take. The hooks each site runs are
framework-neutral (multimodal.training.federated); this module is their Flower adapter, and
docs/federated.md has a template for NVIDIA FLARE around the same hooks.

The simulation runs every site on this machine, in Flower's Simulation Runtime on a local Ray
(multimodal.raydata.cluster: 127.0.0.1 only, no dashboard, usage stats off, its session folder
removed; Flower's telemetry is off through multimodal.runtime). Flower hands each client's messages to
whichever of its Ray workers is free, so a worker here only relays: every site's records are loaded,
and trained on, in that site's own Ray actor (`SiteWorker`), one process per site, which no other
site's records reach. Between the relay and the server travel weights and the counts of
multimodal.training.site_counts, as in a real deployment; records, reports and images stay in the
site's process. Each process uses one thread (train.num_workers decoding workers beside it, if set).
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from multimodal.config import Config, config_from_dict, load_config
from multimodal.errors import UserError
from multimodal.progress import say

if TYPE_CHECKING:
    from multimodal.api import DiagnosisModel

log = logging.getLogger("mmdx")
STRATEGIES = ("fedavg", "fedprox")


def federate(config: Union[Config, dict, str, Path], sites: dict[str, Union[str, Path]], rounds: int = 3, *,
             local_epochs: int = 1, strategy: str = "fedavg", proximal_mu: float = 0.01,
             dp_clip: Optional[float] = None, dp_noise: float = 0.0, progress: bool = True,
             site_class: Optional[type] = None) -> DiagnosisModel:
    """Train `config`'s network across `sites` ({name: records file}) for `rounds` rounds of
    `local_epochs` epochs at each site, in a simulation on this machine (module docstring); → the
    model, ready to save. `strategy`: fedavg, or fedprox with `proximal_mu`. `dp_clip`: clip each
    site's update to this L2 norm and add Gaussian noise of `dp_noise` × dp_clip / sites (Flower's
    DifferentialPrivacyServerSideFixedClipping). `site_class`: what each site's process runs, a
    subclass of SiteWorker."""
    cfg = config if isinstance(config, Config) else (
        config_from_dict(config) if isinstance(config, dict) else load_config(config))
    plan = _plan(cfg, sites, rounds, local_epochs, strategy, proximal_mu, dp_clip, dp_noise)
    _flower()
    from multimodal.raydata import cluster

    t0 = time.perf_counter()
    with cluster(None, num_cpus=len(sites)) as ray:
        prefix = f"mmdx-site-{secrets.token_hex(4)}-"
        worker = ray.remote(num_cpus=0)(site_class or SiteWorker)
        gpus = 1 / len(sites) if _on_gpu(cfg) else 0  # Ray hides the GPUs from an actor that asks for none
        actors = [worker.options(name=f"{prefix}{i}", num_gpus=gpus).remote(cfg.model_dump_json(), str(path), i)
                  for i, path in enumerate(sites.values())]
        outcome = _simulate(plan, prefix, progress)  # Flower shuts Ray down at the end, and the site processes with it
        del actors
    if "error" in outcome:
        raise outcome["error"]
    return _model(cfg, plan, outcome, time.perf_counter() - t0)


def _plan(cfg: Config, sites: dict, rounds: int, local_epochs: int, strategy: str, proximal_mu: float,
          dp_clip: Optional[float], dp_noise: float) -> dict:
    """The run's settings, checked: each mistake is one line, before anything starts."""
    from multimodal.training.federated import check_federable

    check_federable(cfg)
    if len(sites) < 2:
        raise UserError(f"federated training needs at least 2 sites (got {len(sites)})")
    for name, path in sites.items():
        if not Path(path).is_file():
            raise UserError(f"site {name}: {path} is not a file")
    if rounds < 1 or local_epochs < 1:
        raise UserError("--rounds and --local-epochs must be at least 1")
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy}: one of {', '.join(STRATEGIES)}")
    if dp_clip is not None and (dp_clip <= 0 or dp_noise < 0):
        raise UserError("--dp-clip must be positive and --dp-noise at least 0")
    return {"cfg": cfg, "sites": list(sites), "rounds": rounds, "local_epochs": local_epochs,
            "strategy": strategy, "proximal_mu": proximal_mu if strategy == "fedprox" else 0.0,
            "dp_clip": dp_clip, "dp_noise": dp_noise}


def _on_gpu(cfg: Config) -> bool:
    from multimodal.inference.forward import resolve_device

    return resolve_device(cfg.train.device).type == "cuda"


def _flower():
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise UserError("federated training needs the optional extra: pip install 'mmdx[federated]'") from None


class SiteWorker:
    """One site's process (a Ray actor): it reads its own records file and nothing else, and answers the
    relay with weights and counts only."""

    def __init__(self, config_json: str, records: str, index: int, threads: int = 1):
        import torch

        from multimodal.training.federated import Site

        torch.set_num_threads(threads)
        self.cfg = config_from_dict(json.loads(config_json))
        self._site, self._refused = None, None
        try:
            self._site = Site(self.cfg, self.load(records), seed_offset=index)
        except UserError as e:  # said by the first call, in one line, rather than as Ray's traceback of a start
            self._refused = e

    @property
    def site(self):
        if self._refused is not None:
            raise self._refused
        return self._site

    def load(self, records: str):
        """The site's records (the one place a site reads them)."""
        from multimodal.data.records import load_records

        return load_records(records, self.cfg, labels=True)

    def statistics(self) -> str:
        return json.dumps(self.site.statistics())

    def agree(self, prep_json: str, total_epochs: int) -> str:
        from multimodal.data.preprocess import Preprocessing

        agreed = json.loads(prep_json)
        prep = Preprocessing.from_state(self.cfg, agreed["state"], agreed["tokenizer"])
        return json.dumps(self.site.agree(prep, total_epochs))

    def train(self, state: dict, local_epochs: int, class_balance: list, proximal_mu: float) -> tuple[dict, dict]:
        self.site.set_state(state)
        metrics = self.site.train_steps(local_epochs * self.site.steps_per_epoch, class_balance, proximal_mu)
        return self.site.get_state(), metrics

    def evaluate(self, state: dict) -> dict:
        self.site.set_state(state)
        return self.site.evaluate_site()


def _site_call(prefix: str, context, method: str, *args):
    """Call this node's site process; a failure there comes back as one line, never with its records."""
    import ray

    logging.getLogger("flwr").setLevel(logging.ERROR)  # this relay process's Flower: its errors only
    index = int(context.node_config["partition-id"])
    try:
        return index, ray.get(getattr(ray.get_actor(f"{prefix}{index}"), method).remote(*args))
    except ray.exceptions.RayError as e:  # a task's error, or the site process's start (RayActorError)
        said = [line for line in str(e).splitlines() if line.startswith(f"{UserError.__module__}.UserError: ")]
        cause = getattr(e, "cause", None)
        why = said[-1].split(": ", 1)[1] if said else type(cause or e).__name__
        raise RuntimeError(f"mmdx-site-error: {index}: {why}") from None


def client_app(prefix: str):
    """The Flower ClientApp each node runs: it relays the server's messages to its site's process."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def reply(msg, **records):
        return Message(RecordDict(records), reply_to=msg)

    @app.query("statistics")
    def statistics(msg, context):
        index, stats = _site_call(prefix, context, "statistics")
        return reply(msg, counts=ConfigRecord({"site": index, "json": stats}))

    @app.query("agree")
    def agree(msg, context):
        c = msg.content["config"]
        index, counts = _site_call(prefix, context, "agree", c["prep"], int(c["total-epochs"]))
        return reply(msg, counts=ConfigRecord({"site": index, "json": counts}))

    @app.train()
    def train(msg, context):
        c, arrays = msg.content["config"], msg.content["arrays"]
        state = {k: v.numpy() for k, v in arrays.items()}
        _, (state, metrics) = _site_call(prefix, context, "train", state, int(c["local-epochs"]),
                                         list(c["class-balance"]), float(c.get("proximal-mu", 0.0)))
        return reply(msg, arrays=_arrays(state), metrics=MetricRecord(metrics))

    @app.evaluate()
    def evaluate(msg, context):
        state = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        _, metrics = _site_call(prefix, context, "evaluate", state)
        return reply(msg, metrics=MetricRecord(metrics))

    return app


def _arrays(state: dict):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _simulate(plan: dict, prefix: str, progress: bool) -> dict:
    """Flower's Simulation Runtime: one node per site, the ServerApp in this process. → what the server
    kept (prep, final weights, per-round metrics), or {"error": ...}."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    outcome: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        try:
            outcome.update(_serve(grid, plan, progress))
        except Exception as e:  # noqa: BLE001 — handed to the caller, not to Flower's log
            outcome["error"] = e

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    # Flower logs a site's failure with its traceback; the server says it in one line instead (_ask, _check_rounds)
    flwr_log.setLevel(logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL)
    try:
        run_simulation(server_app=server, client_app=client_app(prefix), num_supernodes=len(plan["sites"]),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        flwr_log.setLevel(level)
    if not outcome:
        outcome["error"] = RuntimeError("Flower's simulation ended without running the server")
    return outcome


def _nodes(grid, n: int, wait: float = 120.0) -> list[int]:
    """The nodes' ids, once every site's node has joined (the server starts before they do)."""
    end = time.monotonic() + wait
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() > end:
            raise UserError(f"only {len(nodes)} of {n} sites joined within {wait:.0f}s")
        time.sleep(0.1)
    return nodes


def _ask(grid, plan: dict, action: str, config: dict) -> list[dict]:
    """Send every node one query; → the sites' JSON answers in site order, or one line naming a failure."""
    from flwr.app import ConfigRecord, Message, RecordDict

    nodes = _nodes(grid, len(plan["sites"]))
    msgs = [Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=n, message_type=f"query.{action}")
            for n in nodes]
    answers = [None] * len(plan["sites"])
    for r in grid.send_and_receive(msgs):
        if r.has_error():
            raise UserError(_failure(r.error.reason, plan, action))
        rec = r.content["counts"]
        answers[int(rec["site"])] = json.loads(rec["json"])
    if any(a is None for a in answers):
        missing = [s for s, a in zip(plan["sites"], answers) if a is None]
        raise UserError(f"sites {', '.join(missing)} did not answer ({action})")
    return answers


def _failure(reason: str, plan: dict, action: str) -> str:
    """A site's failure as one line: which site, and what it said (a relay's mmdx-site-error), else
    the last line of Flower's report."""
    if "mmdx-site-error: " not in reason:
        return f"a site failed ({action}): {reason.strip().splitlines()[-1] if reason.strip() else 'no reason given'}"
    index, why = reason.rsplit("mmdx-site-error: ", 1)[1].splitlines()[0].removesuffix("'>").split(": ", 1)
    return f"site {plan['sites'][int(index)]} failed ({action}): {why}"


def _serve(grid, plan: dict, progress: bool) -> dict:
    """The server's side: agree the preprocessing, then the strategy's rounds. → prep, weights, metrics."""
    from flwr.app import ConfigRecord

    from multimodal.model.build import build_network
    from multimodal.training import site_counts
    from multimodal.training.federated import get_state
    from multimodal.training.loop import seed_everything

    cfg, rounds, epochs = plan["cfg"], plan["rounds"], plan["local_epochs"]
    stats = _ask(grid, plan, "statistics", {})
    prep = site_counts.agreed_preprocessing(cfg, stats)
    agreed = json.dumps({"state": prep.state(), "tokenizer": prep.text.to_json() if prep.text else None})
    balance = site_counts.merged_class_balance(_ask(grid, plan, "agree", {"prep": agreed,
                                                                          "total-epochs": rounds * epochs}))
    seed_everything(cfg.train.seed)  # the starting weights `mmdx train` would draw
    net = build_network(cfg, prep)
    if progress:
        say(f"federated: {len(plan['sites'])} sites agreed the preprocessing ({sum(s['n'] for s in stats)} "
            f"training records); {rounds} rounds of {epochs} local epoch{'s' * (epochs > 1)} ({plan['strategy']}"
            f"{', DP clipping' if plan['dp_clip'] is not None else ''})")
    train_config = {"local-epochs": epochs, "class-balance": [float(b) for b in balance]}
    result = _strategy(plan).start(grid, _arrays(get_state(net)), num_rounds=rounds,
                                   train_config=ConfigRecord(train_config), evaluate_config=ConfigRecord(),
                                   evaluate_fn=_round_report(plan, progress))
    _check_rounds(plan, result)
    state = {k: v.numpy() for k, v in result.arrays.items()}
    return {"prep": prep, "net": net, "state": state, "stats": stats, "result": result}


def _strategy(plan: dict):
    """FedAvg or FedProx over every site each round, weighted by patients seen, with the counts summed
    (site_counts' histograms add up; a weighted mean of them would not be a histogram)."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx

    n = len(plan["sites"])
    common = dict(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n,
                  train_metrics_aggr_fn=_summed, evaluate_metrics_aggr_fn=_summed)
    strategy = FedProx(proximal_mu=plan["proximal_mu"], **common) if plan["strategy"] == "fedprox" else FedAvg(**common)
    if plan["dp_clip"] is not None:
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=plan["dp_noise"],
                                                              clipping_norm=plan["dp_clip"], num_sampled_clients=n)
    return strategy


def _summed(records: list, weight_key: str):
    """The sites' metrics: counts and histograms summed, the training loss weighted by patients."""
    from flwr.app import MetricRecord

    ms = [next(iter(r.metric_records.values())) for r in records]
    out = {"sites": len(ms), weight_key: sum(int(m[weight_key]) for m in ms)}
    if "histogram" in ms[0]:
        out["histogram"] = np.sum([np.asarray(m["histogram"], np.int64) for m in ms], axis=0).tolist()
    if "train-loss" in ms[0]:
        out["train-loss"] = sum(float(m["train-loss"]) * int(m[weight_key]) for m in ms) / max(out[weight_key], 1)
    return MetricRecord(out)


def _round_report(plan: dict, progress: bool):
    """Flower calls this with the global weights after each round: a progress line, and no evaluation."""
    t0 = time.perf_counter()

    def report(server_round: int, arrays):
        if progress and server_round:
            say(f"round {server_round}/{plan['rounds']} done ({time.perf_counter() - t0:.0f}s)")
        return None
    return report


def _check_rounds(plan: dict, result) -> None:
    """Every site must have trained and evaluated in every round; Flower logs a failed site and goes on."""
    n = len(plan["sites"])
    for r in range(1, plan["rounds"] + 1):
        for what, got in (("trained", result.train_metrics_clientapp.get(r)),
                          ("evaluated", result.evaluate_metrics_clientapp.get(r))):
            if got is None or int(got["sites"]) != n:
                k = 0 if got is None else int(got["sites"])
                raise UserError(f"round {r}: only {k} of {n} sites {what} (mmdx -v federate ... shows Flower's log)")


def _model(cfg: Config, plan: dict, outcome: dict, seconds: float) -> DiagnosisModel:
    """The federated weights as an ordinary model: the agreed preprocessing, the operating point and
    validation metrics from the last round's hold-out histograms, no temperature scaling."""
    from multimodal.api import DiagnosisModel
    from multimodal.training import site_counts
    from multimodal.training.federated import set_state

    prep, net, result = outcome["prep"], outcome["net"], outcome["result"]
    set_state(net, outcome["state"])
    rounds = plan["rounds"]
    history = []
    for r in range(1, rounds + 1):
        ev = result.evaluate_metrics_clientapp[r]
        val = site_counts.validation_from_histograms([ev["histogram"]], cfg, prep)
        history.append({"round": r, "train_loss": float(result.train_metrics_clientapp[r]["train-loss"]),
                        "val_auroc": val["auroc"]})
    validation = site_counts.validation_from_histograms([result.evaluate_metrics_clientapp[rounds]["histogram"]],
                                                        cfg, prep)
    if "thresholds" in validation:
        prep.labels.thresholds = validation["thresholds"]
    model = DiagnosisModel(cfg, prep)
    model.net = net.eval()
    training = {"federated": {k: plan[k] for k in ("rounds", "local_epochs", "strategy", "proximal_mu",
                                                   "dp_clip", "dp_noise")},
                "sites": [{"name": s, "n_train": st["n"]} for s, st in zip(plan["sites"], outcome["stats"])],
                "history": history, "train_seconds": seconds, "calibrated": False}
    model.metrics = {"trained": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "training": training,
                     "validation": {"federated": validation}}
    return model
