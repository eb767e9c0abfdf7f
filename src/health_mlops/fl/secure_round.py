"""The aggregator's side of one securely aggregated fit round (`fl.secagg`'s protocol), as a state machine.

A secure fit round goes through four or five phases, each closing when every hospital expected has answered (a
hospital that refuses the round is no longer expected), or at its deadline if enough have (at least the Shamir
threshold and the run's `min_hospitals`; else the round is retried with new keys):

  keys         each enrolled hospital advertises its signed public keys     -> U0: the hospitals that did
  shares       each hospital of U0 posts its shares, sealed for each other  -> U1
  masked       each hospital of U1 trains and posts its masked input (its fit result, through `Coordinator.submit`)
                                                                            -> U2, folded into a running sum
  consistency  each hospital of U2 signs the list of survivors U2           -> U3
               (only in a run tolerating colluding hospitals: see `fl.secagg`)
  reveal       each hospital of U3 (U2 without the consistency check), holding U3's signatures of U2,
               reveals its shares for the survivors U2                      -> the sum of U2's updates

What it holds is only what the protocol lets the aggregator see: public keys and certificates, shares sealed to
their recipients, the running sum of masked inputs (never one of them alone: `add_masked` folds and keeps
nothing), the survivors' signatures and the reveals. The coordinator persists it (`to_json`) beside its own
state; the masked inputs themselves live in the service's result files, from which a restore folds the sum again.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from cryptography import x509

from health_mlops.fl.errors import Conflict, Rejected
from health_mlops.fl.secagg import (FRACTION_BITS, EncryptedShares, KeyAdvertisement, Reveal, RoundContext, SecAggError,
                                    default_threshold, dequantize, survivor_signature_valid, unmask_sum)
from health_mlops.fl.strategies import Weights


class SecurePhase(str, Enum):
    keys = "keys"
    shares = "shares"
    masked = "masked"
    consistency = "consistency"
    reveal = "reveal"


def flatten(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensors as one vector, in their names' order (what is masked: one stream of masks for the model)."""
    return np.concatenate([np.asarray(weights[name]).reshape(-1) for name in sorted(weights)])


def unflatten(vector: np.ndarray, template: Mapping[str, np.ndarray]) -> Weights:
    """`vector` cut back into tensors shaped as `template`'s, in their names' order."""
    found, start = {}, 0
    for name in sorted(template):
        shape = np.shape(template[name])
        size = math.prod(shape)
        found[name] = vector[start:start + size].reshape(shape)
        start += size
    if start != len(vector):
        raise ValueError(f"{len(vector)} values for tensors of {start}")
    return found


def base64_of(data: bytes) -> str:
    """Bytes as they travel and are checkpointed: base64 text."""
    return base64.b64encode(data).decode("ascii")


def _bytes(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@dataclass
class SecureRound:
    """One attempt of a secure fit round; `enrolled` are the hospitals its tasks went to (sorted)."""

    run_id: str
    round: int
    attempt: int
    enrolled: tuple[str, ...]
    quorum: int  # the fewest hospitals a phase may close with: the run's min_hospitals, at least the threshold
    phase_deadline: float
    phase: SecurePhase = SecurePhase.keys
    colluders: int = 0  # how many hospitals may collude with the aggregator (the run's secure_colluding_hospitals)
    advertisements: dict[str, KeyAdvertisement] = field(default_factory=dict)
    certificates: dict[str, str] = field(default_factory=dict)  # hospital -> its certificate (PEM), as it sent it
    shares: dict[str, list[EncryptedShares]] = field(default_factory=dict)  # sender -> its shares for the others
    masked_from: dict[str, int] = field(default_factory=dict)  # hospital -> the examples its masked input weighs
    signatures: dict[str, bytes] = field(default_factory=dict)  # hospital -> its signature of the survivors
    reveals: dict[str, Reveal] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)  # hospital -> why it refused the round (it says so)
    _total: np.ndarray | None = None  # Σ of the masked inputs received (uint64, mod 2^64)

    @property
    def threshold(self) -> int:
        """Shares needed to rebuild a secret, for the hospitals enrolled and the colluders tolerated (the hospitals
        check it)."""
        return default_threshold(len(self.enrolled), self.colluders)

    def context(self) -> RoundContext:
        """The round as the hospitals of U0 share it (Shamir indices over U0)."""
        return RoundContext(self.run_id, self.round, self.attempt, tuple(sorted(self.advertisements)), self.threshold)

    @property
    def checks_consistency(self) -> bool:
        """Whether the round runs Bonawitz et al.'s consistency check: when hospitals may collude with the
        aggregator (`fl.secagg` says why it is not needed otherwise)."""
        return self.colluders > 0

    def expected(self) -> list[str]:
        """Who the open phase waits for (not a hospital that refused the round)."""
        expected = {SecurePhase.keys: list(self.enrolled), SecurePhase.shares: sorted(self.advertisements),
                    SecurePhase.masked: sorted(self.shares), SecurePhase.consistency: sorted(self.masked_from),
                    SecurePhase.reveal: sorted(self.signatures if self.checks_consistency
                                               else self.masked_from)}[self.phase]
        return [h for h in expected if h not in self.refusals]

    def answered(self) -> list[str]:
        answers: dict[SecurePhase, Mapping[str, object]] = {
            SecurePhase.keys: self.advertisements, SecurePhase.shares: self.shares,
            SecurePhase.masked: self.masked_from, SecurePhase.consistency: self.signatures,
            SecurePhase.reveal: self.reveals}
        return sorted(answers[self.phase])

    def expect(self, phase: SecurePhase, hospital: str) -> None:
        """Raise Conflict unless `hospital` may send its `phase` message now (the phase is open, it is expected in
        it, and has not sent it)."""
        if self.phase is not phase:
            raise Conflict(f"round {self.round} is in its {self.phase.value} phase, not {phase.value}")
        if hospital not in self.expected():
            raise Conflict(f"{hospital} is not part of round {self.round}'s {phase.value} phase")
        if hospital in self.answered():
            raise Conflict(f"{hospital} has already sent its {phase.value} for round {self.round}")

    def summary(self) -> dict[str, Any]:
        """For the run's record: the fixed point summed (values scaled by 2^fraction_bits, modulo 2^64), the
        threshold, and who took part in each phase."""
        return {"fraction_bits": FRACTION_BITS, "modulus_bits": 64, "threshold": self.threshold,
                "keys": sorted(self.advertisements), "shares": sorted(self.shares), "masked": sorted(self.masked_from),
                "signed": sorted(self.signatures), "revealed": sorted(self.reveals), "refused": dict(self.refusals)}

    # --- what hospitals send ------------------------------------------------------------------------------------

    def add_keys(self, hospital: str, advertisement: KeyAdvertisement, certificate_pem: str) -> None:
        self.expect(SecurePhase.keys, hospital)
        if advertisement.hospital != hospital:
            raise Rejected("bad_keys", f"keys advertised as {advertisement.hospital} by {hospital}")
        if len(advertisement.c_public) != 32 or len(advertisement.s_public) != 32:
            raise Rejected("bad_keys", "public keys are 32-byte X25519 keys")
        self.advertisements[hospital] = advertisement
        self.certificates[hospital] = certificate_pem

    def add_shares(self, hospital: str, shares: list[EncryptedShares]) -> None:
        self.expect(SecurePhase.shares, hospital)
        recipients = sorted(s.recipient for s in shares)
        wanted = sorted(h for h in self.advertisements if h != hospital)
        if recipients != wanted or any(s.sender != hospital for s in shares):
            raise Rejected("bad_shares", f"shares from {hospital} must go to each of {wanted} once")
        self.shares[hospital] = shares

    def add_masked(self, hospital: str, masked: np.ndarray, examples: int) -> None:
        """Fold a masked input (uint64, flattened) into the running sum; nothing of it is kept."""
        self.expect(SecurePhase.masked, hospital)
        if masked.dtype != np.uint64:
            raise Rejected("wrong_dtype", f"a masked input is uint64, not {masked.dtype}")
        if self._total is None:
            self._total = np.zeros(len(masked), dtype=np.uint64)
        if len(masked) != len(self._total):
            raise Rejected("wrong_shape", f"a masked input of {len(masked)} values, expected {len(self._total)}")
        self._total += masked
        self.masked_from[hospital] = examples

    def add_signature(self, hospital: str, signature: bytes) -> None:
        """A survivor's signature of the survivors; refused unless its certificate (sent with its keys) signed
        exactly this round's list (the hospitals would not count it: a junk one is stopped here, not there)."""
        self.expect(SecurePhase.consistency, hospital)
        certificate = x509.load_pem_x509_certificate(self.certificates[hospital].encode("ascii"))
        if not survivor_signature_valid(self.context(), sorted(self.masked_from), signature, certificate):
            raise Rejected("bad_signature", f"{hospital}'s signature is not of this round's survivors "
                                            f"{sorted(self.masked_from)}")
        self.signatures[hospital] = signature

    def add_refusal(self, hospital: str, reason: str) -> None:
        """A hospital of the round says it takes no further part, and why (a key or a list that did not check out:
        the run's record shows it, and no phase waits for it)."""
        if hospital not in self.enrolled:
            raise Conflict(f"{hospital} is not part of round {self.round}")
        self.refusals.setdefault(hospital, reason)

    def add_reveal(self, hospital: str, reveal: Reveal) -> None:
        self.expect(SecurePhase.reveal, hospital)
        if reveal.hospital != hospital:
            raise Rejected("bad_reveal", f"a reveal as {reveal.hospital} from {hospital}")
        self.reveals[hospital] = reveal

    # --- what each hospital may read ----------------------------------------------------------------------------

    def view_for(self, hospital: str) -> dict[str, Any]:
        """What `hospital` needs for its next step, as JSON: the phase, and once a phase has closed its outcome
        (U0's keys and certificates; the shares sealed to this hospital; the survivors)."""
        view: dict[str, Any] = {"phase": self.phase.value, "round": self.round, "attempt": self.attempt,
                                "enrolled": list(self.enrolled), "threshold": self.threshold}
        if self.phase is not SecurePhase.keys:
            view["keys"] = [{"hospital": h, **self._keys_json(h)} for h in sorted(self.advertisements)]
        if self.phase in (SecurePhase.masked, SecurePhase.reveal):
            view["shares"] = [{"sender": s.sender, "ciphertext": base64_of(s.ciphertext)}
                              for sent in self.shares.values() for s in sent if s.recipient == hospital]
            view["peers"] = sorted(self.shares)
        if self.phase in (SecurePhase.consistency, SecurePhase.reveal):
            view["survivors"] = sorted(self.masked_from)
        if self.phase is SecurePhase.reveal and self.checks_consistency:
            view["signatures"] = {h: base64_of(s) for h, s in sorted(self.signatures.items())}
        return view

    def _keys_json(self, hospital: str) -> dict[str, str]:
        """A hospital's advertised keys and certificate, as the others read them and the checkpoint keeps them."""
        keys = self.advertisements[hospital]
        return {"c_public": base64_of(keys.c_public), "s_public": base64_of(keys.s_public),
                "signature": base64_of(keys.signature), "certificate": self.certificates[hospital]}

    # --- phases -------------------------------------------------------------------------------------------------

    def ready(self, now: float) -> bool:
        """Whether the open phase can close now: everyone expected answered, or its deadline passed."""
        return set(self.answered()) >= set(self.expected()) or now >= self.phase_deadline

    def enough(self) -> bool:
        return len(self.answered()) >= max(self.quorum, self.threshold)

    def advance(self, next_deadline: float) -> None:
        """Close the open phase with those who answered (the caller checked `enough`)."""
        order = list(SecurePhase)
        self.phase = order[order.index(self.phase) + 1]
        if self.phase is SecurePhase.consistency and not self.checks_consistency:
            self.phase = SecurePhase.reveal
        self.phase_deadline = next_deadline

    def unmasked_mean(self, template: Mapping[str, np.ndarray]) -> Weights:
        """The example-weighted mean of the survivors' weights, from the sum the reveals unmask; raises
        SecAggError when it cannot be unmasked (too few reveals, false shares)."""
        if self._total is None:
            raise SecAggError("no masked input was received")
        total = unmask_sum(self.context(), self._total, sorted(self.masked_from), list(self.reveals.values()),
                           self.advertisements, peers=sorted(self.shares))
        mean = dequantize(total) / sum(self.masked_from.values())
        return unflatten(mean, template)

    # --- persistence --------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Everything but the running sum (the masked inputs are in the service's result files)."""
        return {"run_id": self.run_id, "round": self.round, "attempt": self.attempt, "enrolled": list(self.enrolled),
                "quorum": self.quorum, "phase": self.phase.value, "phase_deadline": self.phase_deadline,
                "colluders": self.colluders,
                "keys": {h: self._keys_json(h) for h in self.advertisements},
                "shares": {h: [{"recipient": s.recipient, "ciphertext": base64_of(s.ciphertext)} for s in sent]
                           for h, sent in self.shares.items()},
                "signatures": {h: base64_of(s) for h, s in self.signatures.items()},
                "reveals": {h: {"self_seed_shares": {k: base64_of(v) for k, v in r.self_seed_shares.items()},
                                "s_key_shares": {k: base64_of(v) for k, v in r.s_key_shares.items()}}
                            for h, r in self.reveals.items()},
                "refusals": dict(self.refusals)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SecureRound:
        """A round `to_json` saved, without its masked inputs: the coordinator folds them in again (`add_masked`
        needs the masked phase; `restore_masked` folds past it)."""
        restored = cls(raw["run_id"], raw["round"], raw["attempt"], tuple(raw["enrolled"]), raw["quorum"],
                       raw["phase_deadline"], SecurePhase(raw["phase"]), raw.get("colluders", 0))
        for hospital, keys in raw["keys"].items():
            restored.advertisements[hospital] = KeyAdvertisement(hospital, _bytes(keys["c_public"]),
                                                                 _bytes(keys["s_public"]), _bytes(keys["signature"]))
            restored.certificates[hospital] = keys["certificate"]
        for hospital, sent in raw["shares"].items():
            restored.shares[hospital] = [EncryptedShares(hospital, s["recipient"], _bytes(s["ciphertext"]))
                                         for s in sent]
        # none in a checkpoint written before the consistency phase and refusals existed
        restored.signatures = {h: _bytes(s) for h, s in raw.get("signatures", {}).items()}
        restored.refusals = dict(raw.get("refusals", {}))
        for hospital, reveal in raw["reveals"].items():
            restored.reveals[hospital] = Reveal(hospital, {k: _bytes(v) for k, v in reveal["self_seed_shares"].items()},
                                                {k: _bytes(v) for k, v in reveal["s_key_shares"].items()})
        return restored

    def restore_masked(self, hospital: str, masked: np.ndarray, examples: int) -> None:
        """Fold a masked input accepted before a restart back into the sum, whatever the phase now."""
        phase = self.phase
        self.phase = SecurePhase.masked
        try:
            self.add_masked(hospital, masked, examples)
        finally:
            self.phase = phase
