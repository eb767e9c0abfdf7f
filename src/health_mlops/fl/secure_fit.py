"""A hospital node's side of a securely aggregated fit round: `fl.secagg`'s protocol over the aggregator's API.

While the hospital trains (`start`, or `prepare` in turn): advertise this round's keys signed with the hospital's
consortium certificate, check every other hospital's against the consortium CA, send each its sealed shares, take
ours, and draw the masks. After training (`masked`): clip the update to the run's norm bound (the aggregator cannot
check a masked update's norm), weigh it by the examples, quantize it and add the masks. Done beside the training,
the exchanges and the masks' cryptography add nothing to the round's time unless they take longer than it. After the
masked input is accepted (`reveal`): in a run tolerating colluders, sign the survivors the aggregator names and wait
for the threshold of them to have signed that same list; then reveal our shares for them, once. Anything that does
not check out raises `SecAggError`, and the node sends nothing more for the round.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from health_mlops.fl.messages import (AdvertisedKeys, SecureRefusal, SecureReveal, SecureRoundView, SecureShares,
                                      SignedSurvivors, TaskMessage, bytes_of)
from health_mlops.fl.secagg import (EncryptedShares, RoundContext, RoundKeys, SecAggError, ShareHolder,
                                    default_threshold, masks, quantize, sign_survivors, verify_advertisements,
                                    verify_survivors)
from health_mlops.fl.secure_round import SecurePhase, base64_of, flatten, unflatten
from health_mlops.fl.state import TaskKind
from health_mlops.fl.strategies import Weights
from health_mlops.trust.credentials import ClientCredential
from health_mlops.trust.pki import PkiError, revoked_serials


log = logging.getLogger("health_mlops.node")


@dataclass(frozen=True)
class ConsortiumIdentity:
    """What a hospital signs its keys with and checks the others' against: its certificate's key, the CA, and the
    consortium's CRL where its credentials folder has one."""

    signing_key: ec.EllipticCurvePrivateKey
    certificate_pem: str
    ca: x509.Certificate
    crl: Path | None = None

    def revoked(self) -> set[int]:
        """The serial numbers the CRL revokes now (read at each round: a revocation applies to the next)."""
        try:
            return revoked_serials(self.crl.parent) if self.crl else set()
        except PkiError as error:  # without a CRL it can read, no hospital's keys can be trusted this round
            raise SecAggError(f"cannot check the other hospitals' certificates for revocation: {error}") from None

    @classmethod
    def of(cls, credential: ClientCredential) -> ConsortiumIdentity:
        key = serialization.load_pem_private_key(credential.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecAggError(f"{credential.key}: secure aggregation signs with the certificate's EC key")
        return cls(key, credential.certificate.read_text(encoding="ascii"),
                   x509.load_pem_x509_certificate(credential.ca.read_bytes()), credential.crl)


def clip_update(trained: Weights, current: Weights, norm_bound: float) -> tuple[Weights, bool]:
    """`trained` moved back towards `current` so that the update's L2 norm is at most `norm_bound` (what the
    aggregator checks of a plain update), and whether it had to be."""
    squared = sum(float(np.sum((np.asarray(trained[n], np.float64) - np.asarray(current[n], np.float64)) ** 2))
                  for n in trained)
    norm = math.sqrt(squared)
    if norm <= norm_bound:
        return trained, False
    factor = norm_bound / norm
    return {n: (np.asarray(current[n], np.float64) + factor * (np.asarray(trained[n], np.float64)
                                                              - np.asarray(current[n], np.float64)))
            for n in trained}, True


@dataclass(frozen=True)
class ParticipationPolicy:
    """What this hospital takes part in, whatever the aggregator asks: its own settings, not the run's."""

    require_secure_aggregation: bool = False  # a fit task of a plain run is refused: no update leaves in the clear
    min_colluding_hospitals: int = 0  # a secure round's threshold must tolerate at least this many colluders

    def refusal(self, task: TaskMessage) -> str | None:
        """Why this hospital does not do `task`, or None."""
        if task.kind is TaskKind.fit and self.require_secure_aggregation and not task.config.secure_aggregation:
            return ("this hospital takes part only in securely aggregated rounds (REQUIRE_SECURE_AGGREGATION): "
                    "its update would reach the aggregator in the clear")
        return None

    def colluders(self, task: TaskMessage) -> int:
        """The colluding hospitals a secure round must tolerate: the run's, or this hospital's floor if higher."""
        return max(task.config.secure_colluding_hospitals, self.min_colluding_hospitals)


class SecureChannel(Protocol):
    """How a session reaches the aggregator: `HospitalClient`'s secure calls (a test may call a coordinator)."""

    def secure_round(self, task_id: str, *, after: str | None = None) -> SecureRoundView: ...

    def secure_send(self, task_id: str, step: str, body: BaseModel) -> None: ...


class SecureFitSession:
    """One hospital's part in one attempt of a secure fit round (see the module's docstring)."""

    def __init__(self, client: SecureChannel, identity: ConsortiumIdentity, hospital: str, task: TaskMessage,
                 policy: ParticipationPolicy = ParticipationPolicy()) -> None:
        self.client = client
        self.identity = identity
        self.hospital = hospital
        self.task = task
        self.policy = policy
        self.keys = RoundKeys(hospital)
        self.clipped = False
        self._prepared: Future[None] | None = None
        self._refused = False

    def start(self, current: Weights) -> None:
        """`prepare` in a thread of its own while the hospital trains; `masked` waits for it (and raises its
        error: a round whose keys do not check out gets no update). A refusal is told at once, not after training."""
        prepared: Future[None] = Future()

        def prepare() -> None:
            try:
                self.prepare(current)
            except SecAggError as error:
                self.refuse(error)
                prepared.set_exception(error)
            except BaseException as error:  # noqa: BLE001 - raised again by `masked`, in the node's thread
                prepared.set_exception(error)
            else:
                prepared.set_result(None)

        self._prepared = prepared
        threading.Thread(target=prepare, name=f"secure-{self.task.id}", daemon=True).start()

    def _wait(self, after: SecurePhase) -> SecureRoundView:
        """The round once it has left `after` (a retried or closed round is the aggregator's 409, raised)."""
        while True:
            view = self.client.secure_round(self.task.id, after=after.value)
            if view.phase is not after:
                return view

    def prepare(self, current: Weights) -> None:
        """Keys, shares and the masks for an update of `current`'s shape."""
        view = self.client.secure_round(self.task.id)
        if self.hospital not in view.enrolled:
            raise SecAggError(f"{self.hospital} is not enrolled in {self.task.id}'s round")
        colluders = self.policy.colluders(self.task)
        if view.threshold < default_threshold(len(view.enrolled), colluders):
            raise SecAggError(f"threshold {view.threshold} for {len(view.enrolled)} hospitals, {colluders} of which "
                              f"may collude: below {default_threshold(len(view.enrolled), colluders)}, one "
                              "hospital's update could be unmasked")
        announced = RoundContext(self.task.run_id, self.task.round, self.task.attempt, tuple(sorted(view.enrolled)),
                                 view.threshold)
        own = self.keys.advertise(announced, self.identity.signing_key)
        self.client.secure_send(self.task.id, "keys", AdvertisedKeys.of(own, self.identity.certificate_pem))
        view = self._wait(SecurePhase.keys)
        advertised = [k.advertisement(k.hospital) for k in view.keys or []]
        certificates = {k.hospital: x509.load_pem_x509_certificate(k.certificate.encode("ascii"))
                        for k in view.keys or []}
        self.context = RoundContext(self.task.run_id, self.task.round, self.task.attempt,
                                    tuple(sorted(a.hospital for a in advertised)), view.threshold)
        self.advertisements = verify_advertisements(self.context, advertised, certificates, self.identity.ca,
                                                    revoked=self.identity.revoked(), now=dt.datetime.now(dt.UTC))
        self.certificates = certificates  # each checked against the CA: the survivors' signatures are checked on them
        if self.advertisements.get(self.hospital) != own:
            raise SecAggError(f"the aggregator did not pass on {self.hospital}'s own keys")
        self.holder = ShareHolder(self.context, self.keys, self.advertisements)
        self.client.secure_send(self.task.id, "shares", SecureShares.of(self.holder.outgoing()))
        view = self._wait(SecurePhase.shares)
        for share in view.shares or []:
            self.holder.receive(EncryptedShares(share.sender, self.hospital,
                                                bytes_of("shares.ciphertext", share.ciphertext)))
        self.peers = sorted(view.peers or [])
        if self.hospital not in self.peers or not set(self.peers) <= set(self.context.hospitals):
            raise SecAggError(f"peers {self.peers}: not the hospitals of this round with {self.hospital} among them")
        length = sum(np.size(w) for w in current.values())
        self._masks = masks(self.context, self.keys, self.advertisements, length, self.peers)

    def masked(self, trained: Weights, current: Weights, examples: int, norm_bound: float) -> Weights:
        """The masked input for `trained` (the model after local training), as uint64 tensors shaped as it."""
        if self._prepared is not None:
            self._prepared.result()
        clipped, self.clipped = clip_update(trained, current, norm_bound)
        quantized = quantize(examples * flatten(clipped).astype(np.float64), headroom=len(self.context.hospitals))
        quantized += self._masks
        return unflatten(quantized, trained)

    def refuse(self, error: SecAggError) -> None:
        """Tell the aggregator this hospital takes no further part in the round, and why (its record shows it; no
        phase waits for us). Once; best effort: the refusal stands whether or not the message arrives."""
        if self._refused:
            return
        self._refused = True
        try:
            self.client.secure_send(self.task.id, "refuse", SecureRefusal(reason=str(error)[:1000]))
        except Exception as failure:  # noqa: BLE001 - the round is refused either way
            log.info("%s: the aggregator did not take %s's refusal: %s", self.task.id, self.hospital, failure)

    def reveal(self) -> None:
        view = self._wait(SecurePhase.masked)
        if view.survivors is None:
            raise SecAggError(f"the round is in its {view.phase.value} phase, and names no survivors")
        survivors = sorted(view.survivors)
        self.holder.check_survivors(survivors)
        if self.policy.colluders(self.task):  # the consistency check: sign, then reveal only for a list t signed
            if view.phase is not SecurePhase.consistency:
                raise SecAggError(f"the round is in its {view.phase.value} phase: its consistency check was skipped")
            signature = sign_survivors(self.context, survivors, self.identity.signing_key)
            self.client.secure_send(self.task.id, "consistency", SignedSurvivors(signature=base64_of(signature)))
            view = self._wait(SecurePhase.consistency)
            if view.signatures is None or sorted(view.survivors or []) != survivors:
                raise SecAggError(f"the round's survivors are now {view.survivors}, without signatures of the "
                                  f"{survivors} we signed")
            verify_survivors(self.context, survivors, {h: bytes_of(f"signatures.{h}", s) for h, s in
                                                       view.signatures.items()}, self.certificates)
        if view.phase is not SecurePhase.reveal:
            raise SecAggError(f"the round is in its {view.phase.value} phase, not reveal")
        self.client.secure_send(self.task.id, "reveal", SecureReveal.of(self.holder.reveal(survivors)))
