"""CollabEdit under secure aggregation (Flower's SecAgg+): the server only ever holds SUMS.

CollabEdit needs ``S_l = sum_i R_i K_i^T`` and ``G_l = sum_i K_i K_i^T`` per layer (NOTES.md section
1; Lemma 1 of arXiv 2410.09508 in sums form), which is exactly what secure aggregation computes.
In this mode each client sends, through ``secaggplus_mod``, one flat layout of float arrays
(:func:`secagg_layout`)::

    [stats = (1, n_edits) / stats_bound,  per layer: rkt / rkt_bound, packed kkt / kkt_bound] * clip

(with two limbs, every array's high limb and then every array's low limb)
and the server's ``SecAggPlusWorkflow`` hands :meth:`CollabEditSecAgg.aggregate_fit` only the
unmasked aggregate: the same parameters in every ``FitRes``. Neither a client's ``K K^T`` nor
its ``Delta`` nor its ``R K^T`` is ever held by the server.

What Flower's SecAgg+ does to the numbers (flwr 1.41, ``secaggplus_mod`` / ``SecAggPlusWorkflow``):

1. the client multiplies its arrays by ``dq = round(w / max_weight * T) / T`` (``w`` its
   ``num_examples``), CLIPS them to ``[-c, c]`` and quantises them stochastically to integers in
   ``[0, T]`` (``T`` = ``quantization_range``, ``c`` = ``clipping_range``);
2. masks cancel in the modular sum (modulus ``2^32``); the server dequantises and divides by the
   sum of the ``dq``: it receives the WEIGHTED MEAN ``sum_i dq_i x_i / sum_i dq_i``.

So fedke's clients send ``num_examples = 1`` and the workflow uses ``max_weight = 1`` (``dq = 1``
exactly); the server checks every ``num_examples`` is 1 and multiplies the mean by ``N``, the
number of results (the clients whose masked vectors were summed), to undo the weighting.

Scale choice. Values beyond ``[-c, c]`` would be silently clipped, so each array kind is divided by
a PUBLIC bound ``B`` (sent to the clients in the fit config) and multiplied by ``c``: ``x c / B``
lies in ``[-c, c]`` when ``|x| <= B``. A client whose values exceed a bound refuses to send
(:class:`fedke.codec.PayloadError` naming the bound it needed): it drops out of the round, which
SecAgg+ tolerates, instead of corrupting the sum. The default bounds (:func:`default_bounds`)
come from what the server already knows: the per-round edit budget ``M`` and, per layer, the
key second moment ``C`` (``lam C`` is the regulariser) and the weight ``W``:

* ``|(K K^T)_ab| <= max_j (K K^T)_jj <= tr(K K^T) = sum_j |k_j|^2``, about ``M tr(C)``:
  ``B_kkt = M max_l tr(C_l)``;
* ``|(R K^T)_ab| <= sum_j |r_j| |k_j|``, with ``|k| ~ sqrt(tr C)`` and ``|r|`` of the order of the
  layer's typical output norm ``sqrt(tr(W C W^T))``: ``B_rkt = M max_l sqrt(tr C_l) sqrt(tr(W_l C_l W_l^T))``.

On the tiny world model the largest entries are 3-8% of ``B_kkt`` and 2-5% of ``B_rkt`` (so 12-50x
headroom before a client refuses). ``T`` is as large as the 32-bit modulus allows for the number
of clients (:func:`quantization_range_for`: ``N T < 2^32``; ``T = 2^29`` for 5 clients): one
step is ``2 B / T``, about ``4e-9 B``. That is not enough on its own: the merge ``S (A + G)^-1``
amplifies the quantisation noise along the small eigenvalues of ``A = lam C`` (condition numbers
near 1e4), so with one quantisation per value the merged update was off by 1.9e-4 (relative
Frobenius) on the tiny world but by 1.2e-2 on the default world (5 clients x 50 edits). Hence two
LIMBS per value (:func:`split_limbs`, the default): a high limb placed exactly on SecAgg+'s grid
(quantised without error) and the remainder, scaled by ``T``, as a low limb; the error falls to
``2 B / T^2``, float64 rounding in practice (3.6e-13 on the tiny world), for twice the SecAgg+
vector (masks and bandwidth).

What this mode gives up (by design the server sees no single client):

* per-client validation: a malformed or malicious contribution cannot be told apart inside the
  sum (each client's influence is bounded by the clipping, ``|x| <= B`` per entry, and the sum is
  checked: finite, symmetric by construction, PSD up to the quantisation noise);
* per-client diagnostics: no per-client overlap or conflict detection (which needs each
  ``K_i K_i^T`` or ``Delta_i``), no per-request residual norms (only the total number of edits
  travels, inside the sum), no per-client metrics in the clear (clients report none);
* the delta form of Lemma 1 (it needs each ``Delta_i K_i K_i^T``): only the sums form exists here;
* exactness: quantisation adds noise of about one step per entry (measured by bench/privacy.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from fedke.codec import PayloadError, decode_tensors, encode_payload
from fedke.payload import EditPayload
from fedke.secagg import (MODULUS_RANGE, SECAGG_CONFIG_KEYS, SecAggBounds, _bound_of,
                          decode_secagg_sum, default_bounds, encode_secagg, quantization_range_for, secagg_layout,
                          split_limbs)

from .aggregation import ReplyChecks
from .replies import _cid, _safe_text
from .collabedit import CollabEdit

__all__ = [
    "SECAGG_CONFIG_KEYS",
    "CollabEditSecAgg",
    "SecAggBounds",
    "default_bounds",
    "encode_secagg",
    "decode_secagg_sum",
    "quantization_range_for",
    "secagg_layout",
    "simulate_secagg_mean",
    "split_limbs",
]


def simulate_secagg_mean(client_arrays: Sequence[Sequence[np.ndarray]], *, clip: float, quantization_range: int,
                         modulus_range: int = MODULUS_RANGE) -> list[np.ndarray]:
    """What ``SecAggPlusWorkflow`` hands the strategy for these clients (``num_examples = 1``, ``max_weight = 1``).

    Flower's own ``quantize`` (clip, stochastic rounding) per client, the modular integer sum, then
    Flower's ``dequantize``, offset and division by the weight total, as in ``unmask_stage``. The
    pairwise and private masks are left out: they cancel exactly modulo ``modulus_range``. Used to
    measure the quantisation error without running the protocol's cryptography.
    """
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    n = len(client_arrays)
    if n < 1:
        raise ValueError("no clients")
    total = None
    for arrays in client_arrays:
        quantised = [q.astype(np.int64) for q in quantize(list(arrays), clip, quantization_range)]
        total = quantised if total is None else [a + b for a, b in zip(total, quantised)]
    total = [np.mod(a, modulus_range) for a in total]
    q_total_ratio = (n * quantization_range) % modulus_range
    recovered = dequantize(total, clip, quantization_range)
    offset = -(n - 1) * clip
    return [(array + offset) * (quantization_range / q_total_ratio) for array in recovered]


def _is_one(res: Any) -> bool:
    """True when a SecAgg+ result's ``num_examples`` is exactly the integer 1 (never raises)."""
    value = getattr(res, "num_examples", None)
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and int(value) == 1


class CollabEditSecAgg(CollabEdit):
    """CollabEdit over Flower's SecAgg+: merges the SUMS ``S``, ``G`` and never a single client's payload.

    Run it with ``DefaultWorkflow(fit_workflow=strategy.workflow())`` on a ``LegacyContext``; the
    ClientApp needs ``secaggplus_mod`` and clients that reply with :func:`encode_secagg`
    (``num_examples = 1``). See the module docstring for the scaling and what the mode gives up.

    Parameters
    ----------
    bounds : SecAggBounds
        Public per-entry bounds and the clipping range; sent to the clients in every fit config.
    max_clients : int (default: 16)
        The most clients summed in one round; sets the quantisation range
        (:func:`quantization_range_for`). A round with more results is refused.
    limbs : int (default: 2)
        2: every value travels as two limbs (:func:`split_limbs`), doubling the SecAgg+ vector and
        cutting the quantisation error by a factor ``T``; 1: one quantisation (error ``2 B / T``).
    num_shares, reconstruction_threshold : int | float (default: 1.0, 1.0)
        SecAgg+'s secret-sharing settings (floats are fractions of the sampled clients).
    timeout : float | None (default: None)
        SecAgg+ per-stage reply timeout in seconds (None waits for every reply).
    **kwargs
        The :class:`CollabEdit` parameters (``use_sums`` must stay True).
    """

    def __init__(self, *, bounds: SecAggBounds, max_clients: int = 16, limbs: int = 2, num_shares: int | float = 1.0,
                 reconstruction_threshold: int | float = 1.0, timeout: float | None = None, **kwargs: Any) -> None:
        if kwargs.get("use_sums", True) is not True:
            raise ValueError("secure aggregation supports only the sums form of CollabEdit (use_sums=True)")
        kwargs.setdefault("max_norm", None)  # a sum of N payloads: per-client norms do not apply
        super().__init__(**kwargs)
        if not isinstance(bounds, SecAggBounds):
            raise TypeError(f"bounds must be SecAggBounds, got {type(bounds).__name__}")
        self.max_clients = int(max_clients)
        self.quantization_range = quantization_range_for(self.max_clients)
        self.bounds = replace(bounds, limbs=int(limbs), quantization_range=self.quantization_range)
        self.num_shares = num_shares
        self.reconstruction_threshold = reconstruction_threshold
        self.timeout = timeout
        #: The per-client count read back from the last aggregate (1.0 up to quantisation noise).
        self.last_count_check: float | None = None

    def hyperparameters(self) -> dict[str, Any]:
        settings = super().hyperparameters()
        settings.update(secagg_bounds=[self.bounds.kkt, self.bounds.rkt, self.bounds.stats],
                        secagg_clip=self.bounds.clip, secagg_quantization_range=self.quantization_range)
        return settings

    def workflow(self):
        """A ``SecAggPlusWorkflow`` whose quantisation matches this strategy (``max_weight = 1``)."""
        from flwr.server.workflow import SecAggPlusWorkflow

        return SecAggPlusWorkflow(num_shares=self.num_shares, reconstruction_threshold=self.reconstruction_threshold,
                                  max_weight=1.0, clipping_range=self.bounds.clip,
                                  quantization_range=self.quantization_range, modulus_range=MODULUS_RANGE,
                                  timeout=self.timeout)

    def quantisation_step(self, kind: str) -> float:
        """One quantisation step of array kind ``kind`` in payload units: ``2 B / T`` (one limb; a
        conservative bound with two limbs, where a high limb rarely moves by one step)."""
        return 2.0 * _bound_of(self.bounds, kind) / self.quantization_range

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """As :class:`CollabEdit`, plus the public bounds in the config (:meth:`SecAggBounds.to_config`)."""
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if len(instructions) > self.max_clients:
            log(WARNING, "round %s: %s clients sampled, SecAgg+ sums at most max_clients=%s of them",
                server_round, len(instructions), self.max_clients)
            instructions = instructions[: self.max_clients]
        extra = self.bounds.to_config()
        return [(proxy, FitIns(ins.parameters, {**ins.config, **extra})) for proxy, ins in instructions]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Recover the sums from SecAgg+'s mean, check them, merge them as one CollabEdit contribution.

        ``results`` all carry the same aggregate (SecAgg+); their count is ``N``. A round whose
        aggregate cannot be trusted (weights other than 1, more than ``max_clients`` results, a
        layout that does not fit, a count check off by more than the quantisation allows, a sum
        that fails the codec's checks) changes nothing and says why in the log and the metrics.
        """
        n_clients = len(results)
        problem = None
        summed: EditPayload | None = None
        if n_clients > self.max_clients:
            problem = f"{n_clients} results, more than max_clients={self.max_clients} (the modular sum may wrap)"
        elif not all(_is_one(res) for _, res in results):
            problem = "a result with num_examples != 1: SecAgg+ returned a weighted mean that cannot be undone"
        elif n_clients:
            try:
                mean = decode_tensors(results[0][1].parameters.tensors)
                summed, count = decode_secagg_sum(mean, n_clients, self.layer_specs, self.bounds)
                self.last_count_check = count
                tolerance = 8 * n_clients * self.quantisation_step("stats") / self.bounds.stats + 1e-9
                if abs(count - 1.0) > tolerance:
                    problem = f"the count slot reads {count:.6g} per client, expected 1 (layout or weighting wrong)"
                elif self.max_edits_per_client is not None and summed.n_edits > n_clients * self.max_edits_per_client:
                    problem = (f"the aggregate carries {summed.n_edits} edits, more than {n_clients} clients x "
                               f"max_edits_per_client={self.max_edits_per_client}")
            except PayloadError as error:
                problem = _safe_text(error)
            except Exception as error:  # noqa: BLE001 - an aggregate that cannot be read changes nothing
                problem = f"the secure aggregate cannot be read ({type(error).__name__}: {_safe_text(error)})"
        if problem is not None:
            log(ERROR, "round %s: secure aggregate refused: %s; the cumulative update is left unchanged", server_round, problem)
        # This round's checks: the sum's K K^T is PSD up to the quantisation noise (the codec's PSD
        # tolerance widened by it), and it carries N clients' edits (checked against N x the bound above).
        psd_tol = self.psd_tol
        if psd_tol is not None and summed is not None:
            noise = max(4.0 * self.quantisation_step("kkt") * math.sqrt(n_clients * spec.d_in)
                        / max(1.0, float(np.trace(summed.layers[spec.name].kkt))) for spec in self.layer_specs)
            psd_tol = max(psd_tol, noise)
        aggregation = self.begin_round(server_round, notify=False,
                                       checks=replace(ReplyChecks.of(self), psd_tol=psd_tol, max_edits_per_client=None))
        for failure in failures:
            aggregation.add_failure(failure)
        merged_sum = summed is not None and problem is None
        if merged_sum:
            aggregation.add_arrays(_cid(results[0][0]), encode_payload(summed, dtype=np.float64, send_delta=False))
        parameters, metrics = aggregation.finish()
        metrics = dict(metrics)
        accepted = merged_sum and int(metrics.get("n_accepted", 0)) == 1
        metrics.update(n_results=n_clients, n_accepted=n_clients if accepted else 0,
                       n_rejected=0 if accepted or not n_clients else n_clients, secure_aggregation=True)
        if problem is not None:
            metrics["error"] = problem[:500]
        if self.last_rejections:
            log(WARNING, "round %s: the secure aggregate was rejected: %s", server_round, self.last_rejections[-1][1])
        log(INFO, "round %s: secure aggregate of %s client(s), %s edits: %s", server_round, n_clients,
            metrics.get("n_edits", 0), "merged" if metrics.get("applied") else "not merged")
        if self.round_metrics and self.round_metrics[-1].get("server_round") == int(server_round):
            self.round_metrics[-1].update({k: (v if not isinstance(v, np.generic) else v.item()) for k, v in metrics.items()})
        if self.on_round_end is not None:
            self.on_round_end(server_round, dict(metrics))
        return parameters, metrics
