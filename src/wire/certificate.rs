//! Round certificates (docs/SECURITY.md, "Round certificates"): a round's
//! average together with the signed attestations of at least two thirds of
//! the contributors that its input list names. A joiner, a restarted node
//! and a seeding relay take an average only inside a certificate, and check
//! every signature themselves.
//!
//! What a certificate proves is that many distinct keys, each named as a
//! contributor by the input list, computed this average over this list. It
//! cannot prove the list is the round's real one: in an open run keys are
//! free, so whoever holds enough keys can certify an average of its own;
//! with an allowlist, every signer must be on it.

use std::collections::BTreeSet;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use super::codec::{Digest, Limits};
use super::inputs::decode_inputs;
use super::manifest::{Manifest, ManifestKind, SignedManifest};

/// Upper bound on an encoded certificate: it travels in one response frame.
/// About 900 attestations fit, so rounds of up to ~1,300 contributors can
/// be certified.
pub const MAX_CERTIFICATE_BYTES: usize = 256 * 1024;

const BINCODE: bincode::config::Configuration<bincode::config::LittleEndian, bincode::config::Varint, bincode::config::Limit<MAX_CERTIFICATE_BYTES>> =
    bincode::config::standard().with_limit::<MAX_CERTIFICATE_BYTES>();

/// Signatures a round of `contributors` needs: at least two thirds of them
/// (1 of 1, 2 of 2, 2 of 3, 3 of 4, 4 of 6, …).
pub fn threshold(contributors: usize) -> usize {
    contributors.saturating_mul(2).div_ceil(3).max(1)
}

/// Whether `attestation` attests `average`: the same run, round, average
/// and input list.
pub fn attests(attestation: &Manifest, average: &Manifest) -> bool {
    attestation.kind == ManifestKind::Attestation
        && attestation.run_id == average.run_id
        && attestation.round == average.round
        && attestation.adapter_hash == average.adapter_hash
        && attestation.adapter_len == average.adapter_len
        && attestation.inputs.is_some()
        && attestation.inputs == average.inputs
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    /// The average's signed manifest (kind `Average`, naming its inputs digest).
    pub average: SignedManifest,
    /// The input list (`wire::inputs::encode_inputs`) whose blake3 the
    /// average and every attestation name.
    pub inputs: Vec<u8>,
    /// Signed attestations of distinct contributors.
    pub attestations: Vec<SignedManifest>,
}

/// A certificate that passed `verify`.
#[derive(Debug, Clone, PartialEq)]
pub struct Certified {
    pub average: Manifest,
    /// Who signed the average's manifest (whoever served it).
    pub author: PeerId,
    pub contributors: usize,
    /// The contributors that attested, sorted.
    pub signers: Vec<PeerId>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("certificate of {0} bytes exceeds {MAX_CERTIFICATE_BYTES}")]
    TooLarge(usize),
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("invalid certificate: {0}")]
    Invalid(String),
    #[error("certificate signed by {0}, who is not in this run's allowlist")]
    NotAllowed(PeerId),
}

impl Certificate {
    pub fn to_bytes(&self) -> Result<Vec<u8>, CertificateError> {
        let bytes = bincode::serde::encode_to_vec(self, BINCODE).map_err(|e| CertificateError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_CERTIFICATE_BYTES {
            return Err(CertificateError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Decodes at most `MAX_CERTIFICATE_BYTES`; trailing bytes are an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CertificateError> {
        if bytes.len() > MAX_CERTIFICATE_BYTES {
            return Err(CertificateError::TooLarge(bytes.len()));
        }
        let (certificate, read): (Certificate, usize) =
            bincode::serde::decode_from_slice(bytes, BINCODE).map_err(|e| CertificateError::Malformed(e.to_string()))?;
        if read != bytes.len() {
            return Err(CertificateError::Malformed(format!("{} trailing bytes", bytes.len() - read)));
        }
        Ok(certificate)
    }

    /// Checks every signature; that the input list hashes to the digest
    /// the average names; that every attestation is by a distinct
    /// contributor of that list and names the same run, round, average and
    /// inputs; that at least `threshold` of the contributors attested; and
    /// that every signer passes `allowed` (a closed run's allowlist).
    pub fn verify(&self, limits: &Limits, allowed: impl Fn(&PeerId) -> bool) -> Result<Certified, CertificateError> {
        let invalid = |what: String| CertificateError::Invalid(what);
        let (average, author) = self.average.verify(limits).map_err(|e| invalid(format!("its average: {e}")))?;
        if average.kind != ManifestKind::Average {
            return Err(invalid(format!("it certifies a {:?} manifest, not an average", average.kind)));
        }
        if !allowed(&author) {
            return Err(CertificateError::NotAllowed(author));
        }
        let digest = average.inputs.ok_or_else(|| invalid("its average names no input list".into()))?;
        if Digest::of(&self.inputs) != digest {
            return Err(invalid("its input list does not hash to the digest its average names".into()));
        }
        let contributors: BTreeSet<PeerId> = decode_inputs(&self.inputs).map_err(invalid)?.into_iter().map(|(peer, _)| peer).collect();
        let mut signers = BTreeSet::new();
        for signed in &self.attestations {
            let (attestation, signer) = signed.verify(limits).map_err(|e| invalid(format!("an attestation: {e}")))?;
            if !attests(&attestation, &average) {
                return Err(invalid(format!("{signer} attests another run, round, average or input list")));
            }
            if !contributors.contains(&signer) {
                return Err(invalid(format!("{signer} attests but is not a contributor of the input list")));
            }
            if !allowed(&signer) {
                return Err(CertificateError::NotAllowed(signer));
            }
            if !signers.insert(signer) {
                return Err(invalid(format!("{signer} attests twice")));
            }
        }
        let needed = threshold(contributors.len());
        if signers.len() < needed {
            return Err(invalid(format!("{} of {} contributors attest; {needed} are needed", signers.len(), contributors.len())));
        }
        Ok(Certified {
            average,
            author,
            contributors: contributors.len(),
            signers: signers.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use libp2p_identity::Keypair;

    use super::*;
    use crate::wire::inputs::encode_inputs;

    struct Round {
        keys: Vec<Keypair>,
        inputs: Vec<u8>,
        average: SignedManifest,
        manifest: Manifest,
    }

    fn round(contributors: usize) -> Round {
        let keys: Vec<Keypair> = (0..contributors).map(|_| Keypair::generate_ed25519()).collect();
        let pairs: Vec<(PeerId, Digest)> = keys.iter().enumerate().map(|(i, k)| (k.public().to_peer_id(), Digest::of(&[i as u8]))).collect();
        let inputs = encode_inputs(&pairs);
        let author = keys[0].public().to_peer_id();
        let manifest = Manifest {
            kind: ManifestKind::Average,
            inputs: Some(Digest::of(&inputs)),
            ..Manifest::describe(Digest::of(b"run"), 4, &author, b"the average's bytes")
        };
        let average = SignedManifest::sign(&manifest, &keys[0]).unwrap();
        Round { keys, inputs, average, manifest }
    }

    fn attest(key: &Keypair, m: &Manifest) -> SignedManifest {
        let attestation = Manifest::attestation(m.run_id, m.round, &key.public().to_peer_id(), m.adapter_hash, m.adapter_len, m.inputs.unwrap());
        SignedManifest::sign(&attestation, key).unwrap()
    }

    fn certificate(r: &Round, signers: &[usize]) -> Certificate {
        Certificate {
            average: r.average.clone(),
            inputs: r.inputs.clone(),
            attestations: signers.iter().map(|i| attest(&r.keys[*i], &r.manifest)).collect(),
        }
    }

    fn check(c: &Certificate) -> Result<Certified, CertificateError> {
        c.verify(&Limits::default(), |_| true)
    }

    #[test]
    fn two_thirds_of_the_contributors_certify() {
        assert_eq!([1, 2, 3, 4, 5, 6, 7, 9].map(threshold), [1, 2, 2, 3, 4, 4, 5, 6]);
        let r = round(4);
        let certified = check(&certificate(&r, &[0, 2, 3])).unwrap();
        assert_eq!((certified.contributors, certified.signers.len()), (4, 3));
        assert_eq!(certified.average.adapter_hash, r.manifest.adapter_hash);
        let bytes = certificate(&r, &[0, 1, 2, 3]).to_bytes().unwrap();
        assert_eq!(check(&Certificate::from_bytes(&bytes).unwrap()).unwrap().signers.len(), 4);
        assert!(matches!(Certificate::from_bytes(&bytes[..bytes.len() - 1]), Err(CertificateError::Malformed(_))));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Certificate::from_bytes(&longer).unwrap_err().to_string().contains("trailing"));
    }

    #[test]
    fn too_few_repeated_foreign_or_mismatched_signers_are_refused() {
        let r = round(4);
        let error = |c: &Certificate| check(c).unwrap_err().to_string();
        assert!(error(&certificate(&r, &[0, 1])).contains("2 of 4 contributors attest; 3 are needed"));
        assert!(error(&certificate(&r, &[0, 1, 1])).contains("attests twice"));
        // A key the input list does not name.
        let mut c = certificate(&r, &[0, 1]);
        c.attestations.push(attest(&Keypair::generate_ed25519(), &r.manifest));
        assert!(error(&c).contains("not a contributor"));
        // An attestation of another average.
        let mut other = r.manifest.clone();
        other.adapter_hash = Digest::of(b"poison");
        let mut c = certificate(&r, &[0, 1]);
        c.attestations.push(attest(&r.keys[2], &other));
        assert!(error(&c).contains("another run, round, average or input list"));
        // A forged signature.
        let mut c = certificate(&r, &[0, 1, 2]);
        c.attestations[2].signature[0] ^= 1;
        assert!(error(&c).contains("signature"));
        // An input list that is not the one the average names.
        let mut c = certificate(&r, &[0, 1, 2]);
        c.inputs.push(0);
        assert!(error(&c).contains("does not hash"));
        // A closed run: every signer must be allowed.
        let outsider = r.keys[3].public().to_peer_id();
        let closed = certificate(&r, &[0, 1, 3]).verify(&Limits::default(), |p| *p != outsider);
        assert_eq!(closed.unwrap_err(), CertificateError::NotAllowed(outsider));
    }

    #[test]
    fn an_update_is_not_a_certifiable_average() {
        let mut r = round(1);
        r.manifest.kind = ManifestKind::Update;
        r.manifest.inputs = None;
        r.average = SignedManifest::sign(&r.manifest, &r.keys[0]).unwrap();
        r.manifest.inputs = Some(Digest::of(&r.inputs));
        assert!(check(&certificate(&r, &[0])).unwrap_err().to_string().contains("not an average"));
    }
}
