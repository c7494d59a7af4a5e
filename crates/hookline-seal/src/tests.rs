//! Unit tests of the keyring: round trips, rotation standing, refusals.

use super::*;

fn ring(spec: &str) -> Keyring {
    Keyring::parse(spec).expect("a valid keyring")
}

fn key(id: &str) -> String {
    Keyring::generate_spec(id).unwrap().trim().to_string()
}

#[test]
fn seals_and_opens_without_plaintext_in_the_sealed_form() {
    let k = ring(&key("k1"));
    let sealed = k.seal("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=");
    assert!(sealed.starts_with("hlsealed:v1:k1:"), "{sealed}");
    assert!(!sealed.contains("c2VjcmV0"));
    assert_eq!(
        k.open(&sealed).unwrap(),
        "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="
    );
    // A fresh nonce each time.
    assert_ne!(k.seal("same"), k.seal("same"));
}

#[test]
fn plaintext_opens_as_itself_and_stands_plain() {
    let k = ring(&key("k1"));
    assert_eq!(k.open("Bearer abc").unwrap(), "Bearer abc");
    assert_eq!(k.standing("Bearer abc"), Standing::Plain);
}

#[test]
fn an_old_key_still_opens_and_the_new_one_seals() {
    let (k1, k2) = (key("k1"), key("k2"));
    let old = ring(&k1);
    let sealed_old = old.seal("v");
    let both = ring(&format!("{k2},{k1}"));
    assert_eq!(both.current_id(), "k2");
    assert_eq!(both.open(&sealed_old).unwrap(), "v");
    assert_eq!(both.standing(&sealed_old), Standing::Old("k1".into()));
    let sealed_new = both.seal("v");
    assert_eq!(both.standing(&sealed_new), Standing::Current);
    assert_eq!(
        old.open(&sealed_new),
        Err(SealError::UnknownKey("k2".into()))
    );
    assert_eq!(old.standing(&sealed_new), Standing::Unknown("k2".into()));
}

#[test]
fn a_key_file_with_comments_and_lines_parses() {
    let text = format!("# current\n{}\n\n# old\n{}\n", key("b"), key("a"));
    assert_eq!(ring(&text).ids(), vec!["b", "a"]);
}

#[test]
fn tampering_or_the_wrong_key_is_refused() {
    let k = ring(&key("k1"));
    let mut sealed = k.seal("secret value");
    let last = sealed.pop().unwrap();
    sealed.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(k.open(&sealed), Err(SealError::Corrupt("k1".into())));
    let other = ring(&key("k1"));
    assert_eq!(
        other.open(&k.seal("x")),
        Err(SealError::Corrupt("k1".into()))
    );
    assert_eq!(
        k.open("hlsealed:v1:k1:short"),
        Err(SealError::Corrupt("k1".into()))
    );
}

#[test]
fn bad_specs_say_what_is_allowed() {
    for (spec, says) in [
        ("", "no key given"),
        ("nocolon", "<id>:<base64"),
        ("k1:!!!", "not valid base64"),
        ("k1:AAAA", "must be 32"),
        ("bad.id:AAAA", "must be 1 to 32"),
    ] {
        let e = Keyring::parse(spec).unwrap_err().to_string();
        assert!(e.contains(says), "{spec:?}: {e}");
    }
    let k = key("k1");
    let e = Keyring::parse(&format!("{k},{k}")).unwrap_err().to_string();
    assert!(e.contains("given twice"), "{e}");
}

#[test]
fn debug_shows_ids_only() {
    let spec = key("k1");
    let shown = format!("{:?}", ring(&spec));
    assert!(shown.contains("k1"));
    assert!(!shown.contains(spec.split_once(':').unwrap().1));
}
