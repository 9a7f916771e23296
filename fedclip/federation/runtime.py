"""ClientRuntime: the client side of a round, the same code in process, on a Fabric rank
and on a Flower SuperNode.

A turn: take the payload (the global shared state, the learner's declared extras, and
extras the runtime applies itself such as a proximal term), train the local epochs (or
steps) under the client's own RNG, check the upload against the learner's schema, clip and
noise it when local differential privacy is on, and return a `ClientOutcome`. A turn that
raises, or whose loss is not finite, rolls the client back to its state before the turn
and returns the failure with its traceback; the run goes on without that client.
"""

from __future__ import annotations

import contextlib
import copy
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedclip.batch import Batch
from fedclip.client import ClientModule, runtime_terms
from fedclip.data.federated import FederatedData
from fedclip.errors import ClientFailure, ConfigError, Stopped
from fedclip.federation.records import ClientOutcome, Upload, failure_reason, tensor_bytes
from fedclip.learners.base import make_learner
from fedclip.metrics import client_metric
from fedclip.privacy import DifferentialPrivacy, update_norm
from fedclip.strategies.base import Payload, check_upload


def turn_seed(seed: int, rnd: int, client: int) -> int:
    """Seed of client `client`'s turn in round `rnd` (dropout, augmentation)."""
    return int(np.random.SeedSequence([seed, rnd, client, 7]).generate_state(1)[0])


def epoch_seed(seed: int, rnd: int, client: int, epoch: int) -> int:
    """Shuffling seed of a client's local epoch."""
    return int(np.random.SeedSequence([seed, rnd, client, epoch]).generate_state(1)[0])


class ClientRuntime:
    """The clients of this process (all of them, or the one a Flower node holds).

    fabric: the Lightning Fabric that owns the device, precision and optimizer setup;
    stop_requested: asked between optimiser steps; True stops the turn (`Stopped`).
    """

    def __init__(
        self,
        cfg,
        data: FederatedData,
        clip,
        fabric,
        client_ids: Iterable[int],
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.clip = clip
        self.fabric = fabric
        self.stop_requested = stop_requested
        self.uploads = type(cfg.strategy).collects_uploads
        self.privacy = DifferentialPrivacy(cfg.privacy, data.num_clients, cfg.seed)
        self.clients: dict[int, ClientModule] = {k: self.make_client(k) for k in client_ids}
        self.global_states: dict[int, dict[str, Tensor] | None] = {}
        self.eval_models: dict[int, dict[str, dict[str, Tensor]]] = {}  # Payload.models

    # ---- construction ------------------------------------------------------------------
    def make_client(self, k: int) -> ClientModule:
        """Client k: its learner built by the one factory, its own optimizer state."""
        learner = make_learner(
            self.cfg.learner,
            self.clip,
            self.data.classnames,
            self.cfg.seed,
            multilabel=self.data.multilabel,
            multilabel_cfg=self.cfg.multilabel,
            client_id=k,
        )
        own = self.data.client_classes(k)
        if own is not None:  # e.g. ClassChunks: the client's own class list
            names = self.data.all_classnames
            try:
                learner.set_classes([names[c] for c in own])
            except (ConfigError, NotImplementedError) as e:
                raise ConfigError(
                    f"{e}, but every client of {self.data.partitioner!r} classifies among "
                    "its own classes"
                ) from None
        steps = self.steps_per_round(k)
        client = ClientModule(
            k, learner, self.clip, self.cfg.optim, self.data.num_train(k), steps,
            self.cfg.federation.rounds,
        )  # fmt: skip
        return client.to(self.fabric.device)

    def steps_per_round(self, k: int) -> int:
        """Optimiser steps of client k in one round: `federation.local_steps`, or its local
        epochs of batches."""
        fed = self.cfg.federation
        if fed.local_steps is not None:
            return fed.local_steps if self.data.num_train(k) else 0
        return fed.local_epochs * self.data.steps_per_epoch(k)

    def local_batches(self, k: int, rnd: int) -> Iterator[tuple[int, Batch]]:
        """(pass, batch) of client k's local training in round rnd: `local_epochs` passes
        over its shuffled training batches, or, with `local_steps`, exactly that many
        batches from as many passes as needed (each pass shuffled by its own seed)."""
        fed = self.cfg.federation
        budget = fed.local_steps
        epoch = 0
        remap = self.data.train_label_map(k)  # labels -> positions in its class list
        while (budget is None and epoch < fed.local_epochs) or (budget is not None and budget > 0):
            seed = epoch_seed(self.cfg.seed, rnd, k, epoch)
            for batch in self.data.batches(k, "train", epoch_seed=seed):
                if budget is not None:
                    if budget == 0:
                        break
                    budget -= 1
                if remap is not None:
                    batch.labels = remap.to(batch.labels.device)[batch.labels]
                yield epoch, batch
            epoch += 1

    # ---- state ---------------------------------------------------------------------------
    def client_state(self, k: int) -> dict[str, Any]:
        return self.clients[k].client_state()

    def load_client(self, k: int, state: dict[str, Any]) -> None:
        """Replace client k's personal state (learner, optimizers, schedulers)."""
        client = self.clients[k]
        client.optimizer_pairs = None  # built anew for the state's trainable set
        client.load_client_state(state)

    def take(self, k: int, payload: Payload | None) -> int:
        """Client k takes a download (the part its learner shares now, its extras);
        returns the bytes it took. An evaluation payload's `global_state` is kept for the
        global pass of `evaluate_one`."""
        client = self.clients[k]
        self.global_states[k] = None if payload is None else payload.global_state
        self.eval_models[k] = {} if payload is None else payload.models
        payload = client.wanted(payload)
        client.receive(payload)
        return tensor_bytes(payload) if payload is not None else 0

    @contextlib.contextmanager
    def client_rng(self, rnd: int, k: int):
        """Client k's own RNG for its turn of round rnd: what it draws (dropout,
        augmentation) depends neither on the clients before it nor on where it runs."""
        device = self.fabric.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(turn_seed(self.cfg.seed, rnd, k))
            yield

    # ---- a turn --------------------------------------------------------------------------
    def turn(self, k: int, rnd: int, payload: Payload | None) -> ClientOutcome:
        """Client k's turn of round rnd. A failure returns the outcome without upload, with
        its reason and traceback, the client rolled back; a stop request rolls it back and
        raises `Stopped`."""
        snapshot = copy.deepcopy(self.clients[k].client_state())
        outcome = ClientOutcome(k)
        try:
            with self.client_rng(rnd, k):
                self._turn(k, rnd, payload, outcome)
        except Stopped:
            self.load_client(k, snapshot)  # it runs again on resume
            raise
        except Exception as e:  # noqa: BLE001 (a site may crash: the client is left out)
            self.load_client(k, snapshot)
            if self.stop_requested():  # e.g. a data worker hit by the signal
                raise Stopped from e
            return outcome.failed(failure_reason(e), traceback.format_exc())
        outcome.report = self.clients[k].learner.report()
        outcome.metrics.update(
            {f"client/{k}/{n}": float(v) for n, v in outcome.report.items() if _is_number(v)}
        )
        return outcome

    def _turn(self, k: int, rnd: int, payload: Payload | None, outcome: ClientOutcome) -> None:
        client = self.clients[k]
        outcome.down = self.take(k, payload)
        # the update is measured against what the client starts from (the download, for
        # the keys it downloaded)
        reference = {n: v.detach().cpu().clone() for n, v in client.learner.shared_state().items()}
        loss = self.fit_client(k, rnd)
        outcome.loss = loss
        if self.uploads:
            schema = client.learner.upload_schema()
            state = check_upload(client.upload(), schema, client.learner.shared_keys())
            if self.privacy.enabled:
                state, dp_metrics = self.privacy.privatize_upload(state, reference, rnd, k)
                outcome.metrics.update({f"client/{k}/{n}": v for n, v in dp_metrics.items()})
                outcome.released = True  # sent, even if the server then rejects it
                check_upload(state, schema)  # what actually left the client
            else:
                update = {n: state[n] - reference[n] for n in state if n in reference}
                outcome.metrics[f"client/{k}/update_norm"] = update_norm(update)
            outcome.up = tensor_bytes(state)
            outcome.upload = Upload(state, self.data.num_train(k), {"loss": loss})
        if client.learner.end_of_round(loss):
            client.rebuild_optimizers()  # a new trainable set; the schedule goes on

    def fit_client(self, k: int, rnd: int) -> float:
        """Client k's local training of round rnd; returns the mean training loss."""
        client = self.clients[k]
        if not client.learner.has_trainable() or self.data.num_train(k) == 0:
            return float("nan")
        client.train()
        pairs = client.configure_optimizers()
        optimizers = [self.fabric.setup_optimizers(opt) for opt, _ in pairs]
        total, count = 0.0, 0
        for i, (epoch, batch) in enumerate(self.local_batches(k, rnd)):
            if self.stop_requested():
                raise Stopped
            batch = batch.to(self.fabric.device)
            with self.fabric.autocast():
                loss = client.training_step(batch, i)
            if not torch.isfinite(loss):
                raise ClientFailure(
                    f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {i + 1}"
                )
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            self.fabric.backward(loss)
            for opt, (_, sched) in zip(optimizers, pairs, strict=True):
                opt.step()
                sched.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        return total / max(count, 1)

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate_one(self, k: int) -> dict[str, Any]:
        """`evaluate_own` and `evaluate_models`."""
        return {**self.evaluate_own(k), **self.evaluate_models(k)}

    def evaluate_models(self, k: int) -> dict[str, Any]:
        """The strategy's further evaluation models (`Payload.models`), each as the global
        model on client k's share of the global split: {'global_<name>': ...}, under
        base-to-novel {'base_<name>': ..., 'novel_<name>': ...}."""
        out: dict[str, Any] = {}
        data = self.data
        names = data.all_classnames
        for name, state in self.eval_models.get(k, {}).items():
            with self.global_pass(k, state):
                if data.dataset_names is not None:  # several data sets: as evaluate_datasets
                    kinds = ("base", "novel") if data.cfg.base_to_novel else ("global",)
                    for d, dname in enumerate(data.dataset_names):
                        for kind in kinds:
                            classes = data.dataset_classes(d, "all" if kind == "global" else kind)
                            out[f"{kind}_{name}/{dname}"] = self.evaluate_client_on(
                                k, f"{kind}/{dname}", classes
                            )
                elif data.multilabel:
                    out[f"global_{name}"] = self.predict_client(k, "global")
                elif self.data.cfg.base_to_novel:
                    nb = self.data.num_base
                    novel = list(range(nb, len(names)))
                    out[f"base_{name}"] = self.evaluate_client_on(k, "base", list(range(nb)))
                    out[f"novel_{name}"] = self.evaluate_client_on(k, "novel", novel)
                else:
                    every = list(range(len(self.data.classnames)))
                    out[f"global_{name}"] = self.evaluate_client_on(k, "global", every)
        return out

    def evaluate_own(self, k: int) -> dict[str, Any]:
        """Client k's evaluation: {part: (correct, total)}, or {part: (scores, targets)}
        for multi-label data. 'local': its own model (personal parts included) on its own
        test split; 'global': the global part (`global_pass`) on its share of the whole test
        set (pooled over clients: the whole test set). Under base-to-novel, 'local' is among
        its own classes and 'base' / 'novel' are the global part on its share of the base
        and novel test images (the base share is the global split).

        With a validation split (`data.val_fraction`), also 'val_local' (its own model on its
        validation split, among the classes of 'local') and 'val_global' (the global part on
        it, among the training classes)."""
        if self.data.dataset_names is not None:  # several data sets: per data set
            return self.evaluate_datasets(k)
        val = "val" in self.data.parts
        if self.data.multilabel:
            out = {"local": self.predict_client(k)}
            with self.global_pass(k):
                out["global"] = self.predict_client(k, "global")
                if val:
                    out["val_global"] = self.predict_client(k, "val")
            return {**out, "val_local": self.predict_client(k, "val")} if val else out
        every = list(range(len(self.data.classnames)))  # the training classes' positions
        own = self.data.client_classes(k) or every
        if self.data.cfg.base_to_novel:
            own, every = self.data.local_classes(k), list(range(self.data.num_base))
            novel = list(range(self.data.num_base, len(self.data.all_classnames)))
        out = {"local": self.evaluate_client_on(k, "test", own)}
        with self.global_pass(k):
            if self.data.cfg.base_to_novel:
                out["base"] = self.evaluate_client_on(k, "base", every)
                out["novel"] = self.evaluate_client_on(k, "novel", novel)
            else:
                out["global"] = self.evaluate_client_on(k, "global", every)
            if val:
                out["val_global"] = self.evaluate_client_on(k, "val", every)
        return {**out, "val_local": self.evaluate_client_on(k, "val", own)} if val else out

    def evaluate_datasets(self, k: int) -> dict[str, Any]:
        """`evaluate_one` over several data sets: 'local' (also as 'local/<its data set>')
        among its own classes (or all training classes); the global part on its share of
        each data set d's test images among d's classes: 'base/<d>' and 'novel/<d>' under
        base-to-novel (d's base, resp. novel classes), else 'global/<d>' (all of d's)."""
        data = self.data
        own = data.client_classes(k) or data.train_classes.tolist()
        local = self.evaluate_client_on(k, "test", own)
        out = {"local": local}
        if (name := data.client_dataset(k)) is not None:
            out[f"local/{name}"] = local
        kinds = ("base", "novel") if data.cfg.base_to_novel else ("global",)
        with self.global_pass(k):
            for d, name in enumerate(data.dataset_names):
                for kind in kinds:
                    classes = data.dataset_classes(d, "all" if kind == "global" else kind)
                    out[f"{kind}/{name}"] = self.evaluate_client_on(k, f"{kind}/{name}", classes)
            if "val" in data.parts:
                out["val_global"] = self.evaluate_client_on(k, "val", data.train_classes.tolist())
        if "val" in data.parts:
            out["val_local"] = self.evaluate_client_on(k, "val", own)
        return out

    @contextlib.contextmanager
    def global_pass(self, k: int, state: dict[str, Tensor] | None = None):
        """Client k's learner as the global model: the server's aggregate (the evaluation
        payload's `global_state`, or `state`; the tensors its learner shares now) loaded in
        place of its shared tensors, under `global_part()`; its own tensors are restored
        after."""
        learner = self.clients[k].learner
        aggregate = self.global_states.get(k) if state is None else state
        keys = set(learner.shared_keys())
        own = None
        if aggregate:
            own = learner.shared_state()
            device = self.fabric.device
            learner.load_shared_state({n: v.to(device) for n, v in aggregate.items() if n in keys})
        try:
            with learner.global_part():
                yield learner
        finally:
            if own is not None:
                learner.load_shared_state(own)

    @torch.no_grad()
    def evaluate_client(self, k: int) -> float:
        own = self.data.client_classes(k)
        if own is not None:  # its test labels are class ids, its classifier its own list
            correct, total = self.evaluate_client_on(k, "test", own)
            return correct / total if total else float("nan")
        client = self.clients[k]
        client.eval()
        client.accuracy.reset()
        seen = 0
        for i, batch in enumerate(self.data.batches(k, "test")):
            batch = batch.to(self.fabric.device)
            with self.fabric.autocast():
                client.validation_step(batch, i)
            seen += len(batch)
        return float(client.accuracy.compute()) if seen else float("nan")

    @torch.no_grad()
    def predict_client(self, k: int, split: str = "test") -> tuple[Tensor, Tensor]:
        """Client k's logits (N, C) and labels or targets on `split`, on the CPU."""
        client = self.clients[k]
        client.eval()
        scores, labels = [], []
        for batch in self.data.batches(k, split):
            batch = batch.to(self.fabric.device)
            with self.fabric.autocast():
                scores.append(client(batch).float().cpu())
            labels.append(batch.labels.cpu())
        if not scores:
            n = len(self.data.all_classnames)
            return torch.zeros(0, n), torch.zeros(0, n)
        return torch.cat(scores), torch.cat(labels)

    @torch.no_grad()
    def evaluate_client_on(self, k: int, split: str, classes: list[int]) -> tuple[int, int]:
        """(correct, total) of client k on `split`, classifying among `classes` (ids)."""
        client, learner = self.clients[k], self.clients[k].learner
        client.eval()
        trained_on = learner.classnames
        names = self.data.split_classnames(split)
        learner.set_classes([names[c] for c in classes])
        remap = torch.full((len(names),), -1, dtype=torch.long)
        remap[torch.as_tensor(classes)] = torch.arange(len(classes))
        remap = remap.to(self.fabric.device)
        metric = client_metric(len(classes)).to(self.fabric.device)
        total = 0
        try:
            for batch in self.data.batches(k, split):
                batch = batch.to(self.fabric.device)
                with self.fabric.autocast():
                    logits = client(batch)
                metric.update(logits.float(), remap[batch.labels])
                total += len(batch)
        finally:
            learner.set_classes(trained_on)
        correct = round(float(metric.compute()) * total) if total else 0
        return correct, total


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


__all__ = ["ClientRuntime", "Stopped", "runtime_terms", "turn_seed", "epoch_seed"]
