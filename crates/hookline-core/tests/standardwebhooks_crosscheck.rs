//! Cross-checks our signer against the `standardwebhooks` crate, an independent
//! implementation of the standard: what we sign, it must accept, and vice versa.

use hookline_core::signing::{SigningKey, generate_secret, signature_header, verify};

fn headers(id: &str, ts: i64, sig: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("webhook-id", id.parse().unwrap());
    h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
    h.insert("webhook-signature", sig.parse().unwrap());
    h
}

#[test]
fn standardwebhooks_accepts_what_we_sign() {
    let now = chrono::Utc::now().timestamp();
    for body in [
        &br#"{"test": 2432232314}"#[..],
        br#"{"big":12345678901234567890,"order":["z","a"]}"#,
        b"[]",
        "{\"emoji\":\"\u{1F680}\"}".as_bytes(),
    ] {
        let secret = generate_secret();
        let ours = SigningKey::from_secret(&secret).unwrap();
        let sig = signature_header(&[ours], "evt_01JD0000000000000000000000", now, body);
        let theirs = standardwebhooks::Webhook::new(&secret).unwrap();
        theirs
            .verify(body, &headers("evt_01JD0000000000000000000000", now, &sig))
            .expect("standardwebhooks must accept our signature");
    }
}

#[test]
fn we_accept_what_standardwebhooks_signs() {
    let secret = generate_secret();
    let theirs = standardwebhooks::Webhook::new(&secret).unwrap();
    let now = chrono::Utc::now().timestamp();
    let body = br#"{"a":1}"#;
    let sig = theirs.sign("msg_1", now, body).unwrap();
    let ours = SigningKey::from_secret(&secret).unwrap();
    assert_eq!(verify(&ours, "msg_1", now, body, &sig, now, 300), Ok(()));
}

#[test]
fn standardwebhooks_rejects_a_wrong_secret() {
    let now = chrono::Utc::now().timestamp();
    let ours = SigningKey::from_secret(&generate_secret()).unwrap();
    let sig = signature_header(&[ours], "msg_1", now, b"{}");
    let theirs = standardwebhooks::Webhook::new(&generate_secret()).unwrap();
    assert!(theirs.verify(b"{}", &headers("msg_1", now, &sig)).is_err());
}
