"""Secure aggregation's protocol, hospitals and aggregator in one process (no HTTP): the sum is exact to the
fixed point, a masked input tells nothing of its update, dropouts are survived, keys cannot be substituted, and a
hospital reveals nothing that would unmask one update."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from health_mlops.fl.secagg import (FRACTION_BITS, Reveal, RoundContext, RoundKeys, SecAggError, ShareHolder,
                                    default_threshold, dequantize, mask, quantize, sign_survivors, unmask,
                                    verify_advertisements, verify_survivors)
from health_mlops.fl.secure_fit import ConsortiumIdentity
from health_mlops.trust.credentials import ClientCredential
from health_mlops.trust.pki import CA, cert_path, ensure_certificates, key_path, revoke

HOSPITALS = tuple(f"hospital-{i}" for i in range(1, 6))
LENGTH = 10_000


@dataclass(frozen=True)
class Consortium:
    ca: x509.Certificate
    certificates: dict[str, x509.Certificate]
    signing_keys: dict[str, ec.EllipticCurvePrivateKey]
    folder: Path

    @property
    def trust(self) -> dict[str, Any]:
        """What a hospital checks certificates against besides the CA: nothing revoked, the time now."""
        return {"revoked": set(), "now": dt.datetime.now(dt.UTC)}


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    folder = tmp_path_factory.mktemp("pki")
    ensure_certificates(folder, [*HOSPITALS, "outsider"])
    certificates = {h: x509.load_pem_x509_certificate(cert_path(folder, h).read_bytes()) for h in (*HOSPITALS,
                                                                                                   "outsider")}
    keys = {}
    for hospital in (*HOSPITALS, "outsider"):
        key = serialization.load_pem_private_key(key_path(folder, hospital).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        keys[hospital] = key
    return Consortium(x509.load_pem_x509_certificate(cert_path(folder, CA).read_bytes()), certificates, keys, folder)


CONTEXT = RoundContext("run-1", 3, 0, HOSPITALS, threshold=default_threshold(len(HOSPITALS)))


def updates(seed: int = 0, length: int = LENGTH) -> dict[str, tuple[int, np.ndarray]]:
    """Each hospital's example count and weights (FedAvg's inputs)."""
    rng = np.random.default_rng(seed)
    return {h: (int(rng.integers(100, 5000)), rng.normal(0, 0.5, length)) for h in HOSPITALS}


class Round:
    """The protocol's messages up to the masked inputs, each hospital's state kept as a hospital would."""

    def __init__(self, consortium: Consortium, context: RoundContext = CONTEXT) -> None:
        self.context = context
        self.keys = {h: RoundKeys(h) for h in context.hospitals}
        advertised = [self.keys[h].advertise(context, consortium.signing_keys[h]) for h in context.hospitals]
        # What each hospital does with the advertisements the aggregator forwards: check every signature.
        self.advertisements = verify_advertisements(context, advertised, consortium.certificates, consortium.ca,
                                                    **consortium.trust)
        self.holders = {h: ShareHolder(context, self.keys[h], self.advertisements) for h in context.hospitals}
        for sender in context.hospitals:
            for shares in self.holders[sender].outgoing():
                self.holders[shares.recipient].receive(shares)

    def masked(self, hospital: str, count: int, weights: np.ndarray) -> np.ndarray:
        quantized = quantize(count * weights, headroom=len(self.context.hospitals))
        return mask(self.context, self.keys[hospital], self.advertisements, quantized)

    def reveal(self, survivors: list[str], revealing: list[str]) -> list[Reveal]:
        return [self.holders[h].reveal(survivors) for h in revealing]


def fedavg(inputs: dict[str, tuple[int, np.ndarray]]) -> np.ndarray:
    return sum(n * w for n, w in inputs.values()) / sum(n for n, _ in inputs.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_unmasked_sum_is_fedavg_to_the_quantization_error(consortium: Consortium, seed: int) -> None:
    inputs = updates(seed)
    secure = Round(consortium)
    masked = {h: secure.masked(h, n, w) for h, (n, w) in inputs.items()}
    total = unmask(CONTEXT, masked, secure.reveal(list(HOSPITALS), list(HOSPITALS)), secure.advertisements)
    averaged = dequantize(total) / sum(n for n, _ in inputs.values())
    # Each hospital's n·w is rounded to 2^-25 at most; the mean's error is at most H · 2^-25 / Σn.
    bound = len(HOSPITALS) * 2.0 ** -(FRACTION_BITS + 1) / sum(n for n, _ in inputs.values())
    assert np.abs(averaged - fedavg(inputs)).max() <= bound


def test_a_masked_input_is_indistinguishable_from_random(consortium: Consortium) -> None:
    inputs = updates(3, length=1_000_000)  # a sample correlation's noise is 1/sqrt(n): 0.001, a tenth of the bound
    secure = Round(consortium)
    for hospital, (count, weights) in inputs.items():
        masked = secure.masked(hospital, count, weights)
        as_signed = masked.view(np.int64).astype(np.float64)
        assert abs(np.corrcoef(as_signed, count * weights)[0, 1]) < 0.01
        # Uniform over 64 bits: each bit set about half the time, whatever the update's bits were.
        bits = np.unpackbits(masked.view(np.uint8)).mean()
        assert abs(bits - 0.5) < 0.01


def test_hospitals_dropping_before_and_after_masking_leave_the_others_sum(consortium: Consortium) -> None:
    inputs = updates(4)
    secure = Round(consortium)
    before, after = "hospital-2", "hospital-4"  # hospital-2 never sends its masked input; hospital-4 then leaves
    masked = {h: secure.masked(h, n, w) for h, (n, w) in inputs.items() if h != before}
    survivors = sorted(masked)
    reveals = secure.reveal(survivors, [h for h in survivors if h != after])
    assert all(before in r.s_key_shares and before not in r.self_seed_shares for r in reveals)
    total = unmask(CONTEXT, masked, reveals, secure.advertisements)
    counted = {h: inputs[h] for h in survivors}
    assert np.abs(dequantize(total) - sum(n * w for n, w in counted.values())).max() <= len(HOSPITALS) * 2.0 ** -24


def test_too_few_hospitals_left_cannot_unmask_and_too_few_survivors_are_not_revealed_to(consortium: Consortium
                                                                                         ) -> None:
    inputs = updates(5)
    secure = Round(consortium)
    masked = {h: secure.masked(h, n, w) for h, (n, w) in inputs.items()}
    reveals = secure.reveal(list(HOSPITALS), ["hospital-1", "hospital-2"])  # 2 of 5 answer; 3 needed
    with pytest.raises(SecAggError, match="3 needed"):
        unmask(CONTEXT, masked, reveals, secure.advertisements)
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        secure.holders["hospital-3"].reveal(["hospital-3", "hospital-4"])


def test_an_aggregator_asking_twice_to_unmask_one_hospital_is_refused(consortium: Consortium) -> None:
    """Asked first with hospital-3 surviving (its self-mask seed) and then with hospital-3 dropped (its mask key),
    a hospital would hand over both halves of hospital-3's masking: it answers once a round."""
    secure = Round(consortium)
    holder = secure.holders["hospital-1"]
    holder.reveal(list(HOSPITALS))
    with pytest.raises(SecAggError, match="already revealed"):
        holder.reveal([h for h in HOSPITALS if h != "hospital-3"])
    with pytest.raises(SecAggError, match="not listed as a survivor"):
        secure.holders["hospital-2"].reveal([h for h in HOSPITALS if h != "hospital-2"])


def test_two_lists_of_survivors_cannot_both_be_signed_by_the_threshold_of_colluders_and_honest_hospitals(
        consortium: Consortium) -> None:
    """Bonawitz et al.'s consistency check. The aggregator, with hospital-1 colluding (it signs whatever it is
    asked), shows hospital-5 as a survivor to hospitals 2 and 5 and as dropped to hospitals 3 and 4: with both lists
    signed by the threshold, 2's and 5's reveals would hold hospital-5's self-mask shares and 3's and 4's its key's,
    and its input would be unmasked alone."""
    with_5, without_5 = list(HOSPITALS), list(HOSPITALS[:4])
    views = ((with_5, ["hospital-1", "hospital-2", "hospital-5"]), (without_5, ["hospital-1", "hospital-3",
                                                                               "hospital-4"]))

    def signed(context: RoundContext, survivors: list[str], signers: list[str] | tuple[str, ...]) -> dict[str, bytes]:
        return {h: sign_survivors(context, survivors, consortium.signing_keys[h]) for h in signers}

    # A majority (3 of 5) is what one colluder and two honest hospitals reach: both lists pass. This is why a run
    # whose aggregator may have an accomplice says so (secure_colluding_hospitals), raising the threshold.
    for survivors, signers in views:
        verify_survivors(CONTEXT, survivors, signed(CONTEXT, survivors, signers), consortium.certificates)
    tolerant = replace(CONTEXT, threshold=default_threshold(len(HOSPITALS), colluders=1))
    assert tolerant.threshold == 4
    for survivors, signers in views:
        with pytest.raises(SecAggError, match=r"3 survivors .* 4 needed"):
            verify_survivors(tolerant, survivors, signed(tolerant, survivors, signers), consortium.certificates)
    verify_survivors(tolerant, with_5, signed(tolerant, with_5, HOSPITALS[:4]), consortium.certificates)  # one list

    # Not counted: signatures of another round, of another list, by a hospital not among the survivors, or by a
    # certificate that is not the signer's.
    honest = signed(CONTEXT, with_5, HOSPITALS[:3])
    with pytest.raises(SecAggError, match="0 survivors"):
        verify_survivors(CONTEXT, with_5, signed(replace(CONTEXT, round=4), with_5, HOSPITALS[:3]),
                         consortium.certificates)
    with pytest.raises(SecAggError, match="0 survivors"):
        verify_survivors(CONTEXT, without_5, honest, consortium.certificates)
    with pytest.raises(SecAggError, match="2 survivors"):
        verify_survivors(CONTEXT, without_5, {**signed(CONTEXT, without_5, ["hospital-1", "hospital-2"]),
                                              **signed(CONTEXT, without_5, ["hospital-5"])}, consortium.certificates)
    forged = {**{h: honest[h] for h in ("hospital-1", "hospital-2")},
              "hospital-3": sign_survivors(CONTEXT, with_5, consortium.signing_keys["outsider"])}
    with pytest.raises(SecAggError, match="2 survivors"):
        verify_survivors(CONTEXT, with_5, forged, consortium.certificates)


def test_the_threshold_is_a_majority_raised_by_the_colluders_tolerated() -> None:
    assert [default_threshold(n) for n in (2, 3, 5, 20)] == [2, 2, 3, 11]
    assert [default_threshold(5, c) for c in (1, 2, 4, 5)] == [4, 4, 5, 6]  # 6 of 5: no such round (refused)


def test_a_substituted_key_a_foreign_certificate_or_a_replay_is_refused(consortium: Consortium) -> None:
    keys = {h: RoundKeys(h) for h in HOSPITALS}
    advertised = [keys[h].advertise(CONTEXT, consortium.signing_keys[h]) for h in HOSPITALS]
    aggregators_own = RoundKeys("hospital-2").advertise(CONTEXT, consortium.signing_keys["hospital-1"])
    substituted = [replace(a, s_public=aggregators_own.s_public) if a.hospital == "hospital-2" else a
                   for a in advertised]
    with pytest.raises(SecAggError, match="hospital-2: the signature does not match"):
        verify_advertisements(CONTEXT, substituted, consortium.certificates, consortium.ca, **consortium.trust)
    signed_by_another = [aggregators_own if a.hospital == "hospital-2" else a for a in advertised]
    with pytest.raises(SecAggError, match="hospital-2: the signature does not match"):
        verify_advertisements(CONTEXT, signed_by_another, consortium.certificates, consortium.ca,
                              **consortium.trust)
    wrong_certificate = {**consortium.certificates, "hospital-2": consortium.certificates["outsider"]}
    with pytest.raises(SecAggError, match="the certificate is \\['outsider'\\]'s"):
        verify_advertisements(CONTEXT, advertised, wrong_certificate, consortium.ca, **consortium.trust)
    for later in (RoundContext("run-1", 4, 0, HOSPITALS, CONTEXT.threshold),  # the next round, or a retry of this
                  RoundContext("run-1", 3, 1, HOSPITALS, CONTEXT.threshold)):  # one: this attempt's keys, replayed
        with pytest.raises(SecAggError, match="signature does not match"):
            verify_advertisements(later, advertised, consortium.certificates, consortium.ca, **consortium.trust)


def test_shares_altered_or_misdirected_on_the_way_are_refused(consortium: Consortium) -> None:
    secure = Round(consortium)
    sent = secure.holders["hospital-1"].outgoing()
    to_2 = next(s for s in sent if s.recipient == "hospital-2")
    flipped = replace(to_2, ciphertext=to_2.ciphertext[:-1] + bytes([to_2.ciphertext[-1] ^ 1]))
    with pytest.raises(SecAggError, match="do not decrypt"):
        secure.holders["hospital-2"].receive(flipped)
    with pytest.raises(SecAggError, match="not for hospital-3"):
        secure.holders["hospital-3"].receive(to_2)
    posing = replace(to_2, recipient="hospital-3")  # readdressed: its key and associated data are hospital-2's
    with pytest.raises(SecAggError, match="do not decrypt"):
        secure.holders["hospital-3"].receive(posing)


def test_false_shares_of_a_dropped_hospitals_key_are_detected(consortium: Consortium) -> None:
    inputs = updates(6)
    secure = Round(consortium)
    masked = {h: secure.masked(h, n, w) for h, (n, w) in inputs.items() if h != "hospital-5"}
    reveals = secure.reveal(sorted(masked), sorted(masked))
    lying = replace(reveals[0], s_key_shares={"hospital-5": bytes(16)})
    with pytest.raises(SecAggError, match="rebuild a different key"):
        unmask(CONTEXT, masked, [lying, *reveals[1:]], secure.advertisements)


def test_a_value_beyond_the_fixed_point_range_is_refused() -> None:
    with pytest.raises(SecAggError, match="too large"):
        quantize(np.array([2.0 ** 40]), headroom=1)
    with pytest.raises(SecAggError, match="too large"):
        quantize(np.array([np.nan]))


def test_a_revoked_or_expired_certificate_vouches_for_no_keys(consortium: Consortium, tmp_path: Path) -> None:
    """Secure aggregation's peers check each other's certificates as TLS would: a hospital whose certificate the
    consortium revoked, or whose certificate has expired, cannot take part (its keys would let it unmask)."""
    advertised = [RoundKeys(h).advertise(CONTEXT, consortium.signing_keys[h]) for h in HOSPITALS]
    revoked = {consortium.certificates["hospital-3"].serial_number}
    with pytest.raises(SecAggError, match="hospital-3: its certificate has been revoked"):
        verify_advertisements(CONTEXT, advertised, consortium.certificates, consortium.ca, revoked=revoked,
                              now=dt.datetime.now(dt.UTC))
    later = consortium.certificates["hospital-1"].not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(SecAggError, match="hospital-1: its certificate is not valid now"):
        verify_advertisements(CONTEXT, advertised, consortium.certificates, consortium.ca, revoked=set(), now=later)
    # The CRL a node reads: `provision --revoke` re-signs it, and the next round's check sees the revocation.
    folder = tmp_path / "pki"
    ensure_certificates(folder, ["hospital-1", "hospital-2"])
    credential = ClientCredential.from_directory(write_token(folder, "hospital-1"), "hospital-1")
    identity = ConsortiumIdentity.of(credential)
    serial = x509.load_pem_x509_certificate(cert_path(folder, "hospital-2").read_bytes()).serial_number
    assert serial not in identity.revoked()
    revoke(folder, "hospital-2")
    assert serial in identity.revoked()
    (folder / "crl.pem").write_text("not a CRL")
    with pytest.raises(SecAggError, match="cannot check the other hospitals' certificates for revocation"):
        identity.revoked()


def write_token(folder: Path, name: str) -> Path:
    (folder / f"{name}.token").write_text("a token\n")
    return folder
