"""Secure aggregation (Bonawitz et al., CCS 2017): the aggregator learns only the sum of the hospitals' updates.

One round, for the hospitals enrolled in it (their ids sorted; hospital k is Shamir index k + 1):

1. Keys. Each hospital makes two X25519 key pairs for the round: `c` (to encrypt what it sends another hospital
   through the aggregator) and `s` (to agree pairwise masks). It advertises both public keys signed with its
   consortium certificate's key (`KeyAdvertisement`); every hospital checks each advertisement against the
   certificate the consortium's CA issued for that hospital, so the aggregator cannot substitute a key.
2. Shares. Each hospital draws a self-mask seed `b` and splits `b` and the seed of its `s` private key t of n
   (Shamir over GF(2^128), pycryptodome's), encrypting each hospital's shares to it (AES-GCM under their `c`
   agreement).
3. Masked input. y_i = q(n_i x_i) + PRG(b_i) + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ij)  (mod 2^64): the update
   pre-multiplied by the hospital's example count, in fixed point with `fraction_bits` (`quantize`); s_ij is the
   pairwise seed both i and j derive. Any one y_i is uniformly random to whoever lacks b_i or its s_ij.
4. Consistency. The aggregator names the survivors U (whose y arrived). A hospital reveals once, for a list of at
   least t hospitals that includes it: to unmask one y_v alone, an aggregator showing different lists to
   different hospitals, with c accomplices that reveal anything, would need t − c honest hospitals listing v and
   t − c others not listing it (2(t − c) ≤ n − c), or t − c not listing each of v's honest peers; with
   t > (n + c) / 2 (`default_threshold`) there are not enough honest hospitals for either. In a run that
   tolerates colluders (c ≥ 1) the round also runs Bonawitz et al.'s ConsistencyCheck, their protocol against a
   malicious server: each survivor signs the list with its certificate's key and reveals nothing until t
   survivors signed the very list it was shown (`verify_survivors`).
5. Unmasking. Each survivor reveals its shares of b_j for j ∈ U and of s_j's private key for the dropped
   j ∉ U, never both for one hospital (`ShareHolder.reveal` refuses). With t shares of each, the aggregator
   removes the self masks of U and the pairwise masks the survivors shared with the dropped (`unmask`): what is
   left is Σ_{i∈U} q(n_i x_i), and nothing else.

No network here: the services carry the messages. Modulus 2^64 (numpy's uint64 wraps), so the quantized sum's
magnitude must stay below 2^63 / 2^fraction_bits (`quantize` refuses values that could not).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from health_mlops.errors import FederationError

FRACTION_BITS = 24  # fixed point: a quantized value is round(v · 2^24); its error at most 2^-25
# The secrets shared are 16-byte seeds (Shamir over GF(2^128) shares 16 bytes at once, and its combining is the
# unmasking's main cost): the self mask's key and the s private key are derived from them (HKDF).
_SEED_BYTES = 16
_KEY_BYTES = 32


class SecAggError(FederationError):
    """A secure-aggregation message that must not be acted on (a bad signature, a share that does not decrypt, a
    request to reveal what would expose one hospital's update) or a round that cannot be unmasked."""


@dataclass(frozen=True)
class RoundContext:
    """What binds every message to one round of one run: signatures, key derivations and encryption use it."""

    run_id: str
    round: int
    attempt: int  # a retried round starts over with new keys: nothing of an earlier attempt is accepted
    hospitals: tuple[str, ...]  # enrolled in the round, sorted: hospital k holds Shamir index k + 1
    threshold: int  # shares needed to reconstruct a secret: the fewest hospitals that must remain

    def __post_init__(self) -> None:
        if list(self.hospitals) != sorted(set(self.hospitals)):
            raise ValueError("the round's hospitals must be sorted and distinct")
        if not 2 <= self.threshold <= len(self.hospitals):
            raise ValueError(f"threshold {self.threshold} must be between 2 and {len(self.hospitals)} hospitals")

    def index(self, hospital: str) -> int:
        return self.hospitals.index(hospital) + 1

    def label(self, purpose: str, *parts: str) -> bytes:
        return "\x1f".join(("health-mlops secagg v1", purpose, self.run_id, f"{self.round}.{self.attempt}",
                          *parts)).encode()


def default_threshold(hospitals: int, colluders: int = 0) -> int:
    """The fewest shares that rebuild a secret, t > (n + c) / 2 for n hospitals of which c may collude with the
    aggregator: two lists of survivors can then never each be signed by t (the c sign both, each other hospital
    one), so no hospital reveals what would unmask one input alone; and fewer than t hospitals, with the
    aggregator, learn nothing of an honest one's update. With c = 0, a majority. The round survives up to n − t
    dropouts."""
    return max(2, (hospitals + colluders) // 2 + 1)


# --- keys ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyAdvertisement:
    hospital: str
    c_public: bytes  # X25519: shares sent to this hospital are encrypted under it
    s_public: bytes  # X25519: this hospital's pairwise masks are agreed under it
    signature: bytes  # ECDSA (the hospital's certificate key) over the round's context and both keys

    def signed_bytes(self, context: RoundContext) -> bytes:
        return context.label("keys", self.hospital) + self.c_public + self.s_public


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass
class RoundKeys:
    """One hospital's secrets for one round: never sent, except as Shamir shares."""

    hospital: str
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_seed: bytes = field(default_factory=lambda: os.urandom(_SEED_BYTES))  # the s private key's seed
    self_seed: bytes = field(default_factory=lambda: os.urandom(_SEED_BYTES))

    @property
    def s_key(self) -> X25519PrivateKey:
        return s_key_of(self.s_seed)

    def advertise(self, context: RoundContext, signing_key: ec.EllipticCurvePrivateKey) -> KeyAdvertisement:
        unsigned = KeyAdvertisement(self.hospital, _raw(self.c_key.public_key()), _raw(self.s_key.public_key()), b"")
        signature = signing_key.sign(unsigned.signed_bytes(context), ec.ECDSA(hashes.SHA256()))
        return KeyAdvertisement(unsigned.hospital, unsigned.c_public, unsigned.s_public, signature)



def s_key_of(seed: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_derive(seed, b"health-mlops secagg v1 s key"))


def self_mask(seed: bytes, length: int) -> np.ndarray:
    return prg(_derive(seed, b"health-mlops secagg v1 self mask"), length)


def verify_advertisements(context: RoundContext, advertisements: Sequence[KeyAdvertisement],
                          certificates: Mapping[str, x509.Certificate], ca: x509.Certificate, *,
                          revoked: AbstractSet[int], now: dt.datetime) -> dict[str, KeyAdvertisement]:
    """Every enrolled hospital's keys, by hospital, once each is checked: its certificate was issued by the
    consortium's CA to that hospital, is valid `now`, is not among the CRL's `revoked` serial numbers, and signs
    exactly these keys for this round. Raises SecAggError naming the hospital otherwise (a substituted key, a
    replayed advertisement, a certificate from elsewhere, expired or revoked)."""
    found: dict[str, KeyAdvertisement] = {}
    for advertisement in advertisements:
        hospital = advertisement.hospital
        if hospital not in context.hospitals or hospital in found:
            raise SecAggError(f"keys from {hospital!r}: not a hospital of this round, or advertised twice")
        certificate = certificates.get(hospital)
        if certificate is None:
            raise SecAggError(f"keys from {hospital}: no certificate to check them against")
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise SecAggError(f"keys from {hospital}: its certificate was not issued by the consortium's CA") from None
        if certificate.serial_number in revoked:
            raise SecAggError(f"keys from {hospital}: its certificate has been revoked")
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise SecAggError(f"keys from {hospital}: its certificate is not valid now (valid from "
                              f"{certificate.not_valid_before_utc:%Y-%m-%d} to "
                              f"{certificate.not_valid_after_utc:%Y-%m-%d})")
        names = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [hospital]:
            raise SecAggError(f"keys from {hospital}: the certificate is {names}'s")
        public = certificate.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise SecAggError(f"keys from {hospital}: the certificate's key cannot sign")
        try:
            public.verify(advertisement.signature, advertisement.signed_bytes(context), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SecAggError(f"keys from {hospital}: the signature does not match (substituted keys?)") from None
        found[hospital] = advertisement
    return found


def _derive(shared: bytes, info: bytes, length: int = _KEY_BYTES) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=info).derive(shared)


def pairwise_seed(context: RoundContext, own: str, own_s_key: X25519PrivateKey, other: str, other_s_public: bytes
                  ) -> bytes:
    """The seed of the mask `own` and `other` share (both derive the same one)."""
    shared = own_s_key.exchange(X25519PublicKey.from_public_bytes(other_s_public))
    return _derive(shared, context.label("mask", *sorted((own, other))))


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniformly random uint64 from a 32-byte seed (ChaCha20's keystream)."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(cipher.update(bytes(8 * length)), dtype="<u8").copy()


# --- shares --------------------------------------------------------------------------------------------------


def _split(seed: bytes, threshold: int, count: int) -> list[bytes]:
    """Each of `count` shares of a 16-byte seed (share k for index k + 1)."""
    return [share for _, share in Shamir.split(threshold, count, seed, ssss=False)]


def _combine(shares: Mapping[int, bytes]) -> bytes:
    """The 16-byte seed from shares by Shamir index (at least the threshold of them)."""
    return bytes(Shamir.combine(list(shares.items()), ssss=False))


@dataclass(frozen=True)
class EncryptedShares:
    """One hospital's shares of another's secrets, readable by that other hospital only."""

    sender: str
    recipient: str
    ciphertext: bytes  # nonce, then AES-GCM of its share of the sender's self-mask seed and of its s key


@dataclass(frozen=True)
class Reveal:
    """What one hospital reveals to unmask a round: its shares of the survivors' self-mask seeds and of the
    dropped hospitals' s keys, by the hospital they belong to."""

    hospital: str
    self_seed_shares: dict[str, bytes]
    s_key_shares: dict[str, bytes]


class ShareHolder:
    """One hospital's side of a round's secret sharing: it splits its own secrets (`outgoing`: everyone's shares,
    each encrypted to its recipient; its own share it keeps), keeps the shares the others send it (`receive`), and
    reveals them once, and only as the protocol allows (`reveal`)."""

    def __init__(self, context: RoundContext, keys: RoundKeys, advertisements: Mapping[str, KeyAdvertisement]
                 ) -> None:
        self.context = context
        self.keys = keys
        self.advertisements = dict(advertisements)
        count = len(context.hospitals)
        self._own_self_seed = _split(keys.self_seed, context.threshold, count)
        self._own_s_key = _split(keys.s_seed, context.threshold, count)
        own = context.index(keys.hospital) - 1
        self._self_seed: dict[str, bytes] = {keys.hospital: self._own_self_seed[own]}
        self._s_key: dict[str, bytes] = {keys.hospital: self._own_s_key[own]}
        self._revealed = False

    def outgoing(self) -> list[EncryptedShares]:
        """The shares of this hospital's secrets for every other hospital of the round."""
        sent = []
        for k, recipient in enumerate(self.context.hospitals):
            if recipient == self.keys.hospital:
                continue
            nonce = os.urandom(12)
            sealed = AESGCM(self._share_key(recipient)).encrypt(
                nonce, self._own_self_seed[k] + self._own_s_key[k],
                self.context.label("share", self.keys.hospital, recipient))
            sent.append(EncryptedShares(self.keys.hospital, recipient, nonce + sealed))
        return sent

    def _share_key(self, other: str) -> bytes:
        shared = self.keys.c_key.exchange(X25519PublicKey.from_public_bytes(self.advertisements[other].c_public))
        return _derive(shared, self.context.label("shares", *sorted((self.keys.hospital, other))))

    def receive(self, shares: EncryptedShares) -> None:
        """Keep another hospital's shares; raises SecAggError unless they are for us and decrypt (untampered)."""
        if (shares.recipient != self.keys.hospital or shares.sender == self.keys.hospital
                or shares.sender not in self.advertisements):
            raise SecAggError(f"shares from {shares.sender!r} to {shares.recipient!r} are not for "
                              f"{self.keys.hospital}")
        try:
            plain = AESGCM(self._share_key(shares.sender)).decrypt(
                shares.ciphertext[:12], shares.ciphertext[12:],
                self.context.label("share", shares.sender, self.keys.hospital))
        except InvalidTag:
            raise SecAggError(f"shares from {shares.sender} do not decrypt: altered on the way") from None
        self._self_seed[shares.sender], self._s_key[shares.sender] = plain[:_SEED_BYTES], plain[_SEED_BYTES:]

    def reveal(self, survivors: Sequence[str]) -> Reveal:
        """Shares of each survivor's self-mask seed and of each dropped hospital's s key. Once a round: a second,
        different list of survivors would reveal both secrets of some hospital, hence its update. Refused too for
        a list without this hospital (it sent its masked input) or shorter than the threshold."""
        if self._revealed:
            raise SecAggError(f"{self.keys.hospital} has already revealed its shares for this round")
        self.check_survivors(survivors)
        self._revealed = True
        dropped = [h for h in self.context.hospitals if h not in survivors]
        return Reveal(self.keys.hospital, {h: self._self_seed[h] for h in survivors if h in self._self_seed},
                      {h: self._s_key[h] for h in dropped if h in self._s_key})

    def check_survivors(self, survivors: Sequence[str]) -> None:
        """Raise SecAggError unless `survivors` is a list this hospital may reveal for: hospitals of the round,
        itself among them (it sent its masked input), at least the threshold."""
        unknown = sorted(set(survivors) - set(self.context.hospitals))
        if unknown:
            raise SecAggError(f"survivors {unknown} are not hospitals of this round")
        if self.keys.hospital not in survivors:
            raise SecAggError(f"{self.keys.hospital} sent its masked input but is not listed as a survivor")
        if len(set(survivors)) < self.context.threshold:
            raise SecAggError(f"{len(set(survivors))} survivors, fewer than the threshold {self.context.threshold}")


# --- consistency ---------------------------------------------------------------------------------------------


def _survivors_signed_bytes(context: RoundContext, survivors: Sequence[str]) -> bytes:
    return context.label("survivors", *sorted(survivors))


def sign_survivors(context: RoundContext, survivors: Sequence[str], signing_key: ec.EllipticCurvePrivateKey) -> bytes:
    """A survivor's signature of the list of survivors it was shown (ECDSA with its certificate's key)."""
    return signing_key.sign(_survivors_signed_bytes(context, survivors), ec.ECDSA(hashes.SHA256()))


def survivor_signature_valid(context: RoundContext, survivors: Sequence[str], signature: bytes,
                             certificate: x509.Certificate) -> bool:
    """Whether `signature` is the certificate's holder's over exactly this list of survivors, for this round."""
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        public.verify(signature, _survivors_signed_bytes(context, survivors), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_survivors(context: RoundContext, survivors: Sequence[str], signatures: Mapping[str, bytes],
                     certificates: Mapping[str, x509.Certificate]) -> None:
    """Raise SecAggError unless at least the threshold of the survivors signed exactly `survivors` for this round.
    `certificates`: the hospitals' certificates, already checked against the CA with their keys. A signature that
    does not verify is not counted (whoever sent it, it vouches for no list)."""
    valid = sorted(h for h, signature in signatures.items() if h in survivors and h in certificates
                   and survivor_signature_valid(context, survivors, signature, certificates[h]))
    if len(valid) < context.threshold:
        raise SecAggError(f"{len(valid)} survivors ({', '.join(valid) or 'none'}) signed the survivors "
                          f"{list(survivors)}, {context.threshold} needed: the aggregator may have shown others "
                          "another list")


# --- masking -------------------------------------------------------------------------------------------------


def quantize(values: np.ndarray, fraction_bits: int = FRACTION_BITS, *, headroom: int = 1) -> np.ndarray:
    """`values` in fixed point as uint64 (two's complement). `headroom`: how many such vectors will be summed;
    a value whose sum could overflow the signed 64-bit range is refused."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 2.0 ** fraction_bits)
    limit = 2.0 ** 63 / headroom
    if not np.isfinite(scaled).all() or (np.abs(scaled) >= limit).any():
        raise SecAggError(f"an update value is too large for fixed point with {fraction_bits} fraction bits "
                          f"summed over {headroom}")
    return scaled.astype(np.int64).view(np.uint64)


def dequantize(values: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    return values.view(np.int64).astype(np.float64) / 2.0 ** fraction_bits


def masks(context: RoundContext, keys: RoundKeys, advertisements: Mapping[str, KeyAdvertisement], length: int,
          peers: Sequence[str] | None = None) -> np.ndarray:
    """What `keys`' hospital adds to its quantized update (`length` values): its self mask and its pairwise masks,
    added towards hospitals after it in the round's order and subtracted towards those before, with each of
    `peers`: the hospitals that sent their shares (default: every hospital of the round). It needs no update, so a
    hospital draws it while it trains."""
    total = self_mask(keys.self_seed, length)
    for other in context.hospitals if peers is None else peers:
        if other == keys.hospital:
            continue
        pairwise = prg(pairwise_seed(context, keys.hospital, keys.s_key, other, advertisements[other].s_public), length)
        if keys.hospital < other:
            total += pairwise
        else:
            total -= pairwise
    return total


def mask(context: RoundContext, keys: RoundKeys, advertisements: Mapping[str, KeyAdvertisement],
         quantized: np.ndarray, peers: Sequence[str] | None = None) -> np.ndarray:
    """The masked input y_i of `keys`' hospital: its quantized update plus its `masks`."""
    return quantized.astype(np.uint64) + masks(context, keys, advertisements, len(quantized), peers)


def unmask(context: RoundContext, masked: Mapping[str, np.ndarray], reveals: Sequence[Reveal],
           advertisements: Mapping[str, KeyAdvertisement], peers: Sequence[str] | None = None) -> np.ndarray:
    """Σ of the survivors' quantized updates (uint64), from their masked inputs and the hospitals' reveals;
    `peers` as `mask` had them."""
    total = np.zeros(len(next(iter(masked.values()))), dtype=np.uint64)
    for vector in masked.values():
        total += vector
    return unmask_sum(context, total, sorted(masked), reveals, advertisements, peers)


def unmask_sum(context: RoundContext, total: np.ndarray, survivors: Sequence[str], reveals: Sequence[Reveal],
               advertisements: Mapping[str, KeyAdvertisement], peers: Sequence[str] | None = None) -> np.ndarray:
    """Σ of the survivors' quantized updates (uint64), from the sum of their masked inputs (`total`) and the
    hospitals' reveals. Raises SecAggError when fewer than the threshold of shares came for a secret that must be
    rebuilt, or false shares rebuild a dropped hospital's key."""
    dropped = [h for h in (context.hospitals if peers is None else peers) if h not in survivors]
    length = len(total)
    total = total.copy()
    for survivor in survivors:
        seed = _rebuild(context, survivor, {context.index(r.hospital): r.self_seed_shares[survivor]
                                            for r in reveals if survivor in r.self_seed_shares})
        total -= self_mask(seed, length)
    for gone in dropped:
        s_key = s_key_of(_rebuild(context, gone, {context.index(r.hospital): r.s_key_shares[gone]
                                                  for r in reveals if gone in r.s_key_shares}))
        if _raw(s_key.public_key()) != advertisements[gone].s_public:
            raise SecAggError(f"the shares of {gone}'s key rebuild a different key: a hospital revealed false shares")
        for survivor in survivors:
            # The survivor added +PRG(s) towards a later hospital and −PRG(s) towards an earlier one: undo it.
            pairwise = prg(pairwise_seed(context, gone, s_key, survivor, advertisements[survivor].s_public), length)
            if survivor < gone:
                total -= pairwise
            else:
                total += pairwise
    return total


def _rebuild(context: RoundContext, owner: str, shares: Mapping[int, bytes]) -> bytes:
    if len(shares) < context.threshold:
        raise SecAggError(f"{len(shares)} shares of {owner}'s secret, {context.threshold} needed: the round cannot "
                          "be unmasked")
    return _combine(dict(sorted(shares.items())[:context.threshold]))

