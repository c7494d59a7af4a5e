//! The operator key that seals secrets at rest, from the configuration to the store.
//!
//! At every start (`serve`, `migrate`) the keyring is loaded (`encryption_key`, else
//! `encryption_key_file`, else in embedded mode `<data_dir>/encryption.key`, created at
//! the first start), every row written before sealing is sealed, and the store's
//! registry port seals from then on. Without a key, a store that holds sealed values is
//! refused, naming the setting; nothing is written. `admin rotate-encryption-key`
//! re-seals every row under the current key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use hookline_seal::Keyring;
use hookline_store::sealing::{self, SealReport, Walk};

use crate::backends::{AnyStore, StoreAt};
use crate::config::Config;

/// The embedded mode's key file, inside the data directory.
pub const KEY_FILE: &str = "encryption.key";
/// The id of the key the embedded mode generates.
const GENERATED_KEY_ID: &str = "k1";
const SETTINGS: &str = "HOOKLINE_ENCRYPTION_KEY or HOOKLINE_ENCRYPTION_KEY_FILE \
                        (encryption_key / encryption_key_file)";

/// Where the keyring came from, for the log.
enum Source {
    Setting,
    File(PathBuf),
    Generated(PathBuf),
}

/// The keyring the settings name, if any.
fn configured(config: &Config) -> anyhow::Result<Option<(Keyring, Source)>> {
    let key = config
        .encryption_key
        .as_ref()
        .map(|k| k.0.as_str())
        .filter(|k| !k.is_empty());
    let file = config
        .encryption_key_file
        .as_deref()
        .filter(|f| !f.as_os_str().is_empty());
    match (key, file) {
        (Some(_), Some(_)) => bail!(
            "both encryption_key and encryption_key_file are set; set one of them \
             (HOOKLINE_ENCRYPTION_KEY or HOOKLINE_ENCRYPTION_KEY_FILE)"
        ),
        (Some(key), None) => {
            let ring = Keyring::parse(key).context("HOOKLINE_ENCRYPTION_KEY (encryption_key)")?;
            Ok(Some((ring, Source::Setting)))
        }
        (None, Some(file)) => Ok(Some((read_key_file(file)?, Source::File(file.into())))),
        (None, None) => Ok(None),
    }
}

fn read_key_file(file: &Path) -> anyhow::Result<Keyring> {
    let text = std::fs::read_to_string(file).with_context(|| {
        format!(
            "cannot read the encryption key file {} (encryption_key_file)",
            file.display()
        )
    })?;
    if let Ok(meta) = std::fs::metadata(file)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %file.display(),
            "the encryption key file can be read by other users; make it 0600"
        );
    }
    Keyring::parse(&text).with_context(|| format!("encryption key file {}", file.display()))
}

/// Creates `file` (0600, never overwriting one) holding a new random key.
fn generate_key_file(file: &Path) -> anyhow::Result<Keyring> {
    let spec = Keyring::generate_spec(GENERATED_KEY_ID)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("cannot create the encryption key file {}", file.display()))?;
    out.write_all(spec.as_bytes())
        .and_then(|()| out.sync_all())
        .with_context(|| format!("cannot write the encryption key file {}", file.display()))?;
    Ok(Keyring::parse(&spec)?)
}

/// Loads the keyring for `store` at `at`, seals every row written before, and attaches
/// it. `create_key`: the embedded mode may make its key file (`serve`, `migrate`).
pub async fn attach(
    store: &mut AnyStore,
    config: &Config,
    at: &StoreAt,
    create_key: bool,
) -> anyhow::Result<()> {
    let found = match (configured(config)?, at) {
        (Some(found), _) => Some(found),
        (None, StoreAt::Sqlite(dir)) => {
            let file = dir.join(KEY_FILE);
            if file.exists() {
                Some((read_key_file(&file)?, Source::File(file)))
            } else if create_key {
                refuse_if_sealed(store, Some(&file)).await?;
                Some((generate_key_file(&file)?, Source::Generated(file)))
            } else {
                None
            }
        }
        (None, StoreAt::Postgres(_)) => None,
    };
    let Some((keyring, source)) = found else {
        refuse_if_sealed(store, None).await?;
        tracing::warn!(
            "no encryption key configured: signing secrets and header values are stored \
             unsealed; set {SETTINGS}"
        );
        return Ok(());
    };
    match &source {
        Source::Setting => {
            tracing::info!(keys = ?keyring.ids(), "encryption keyring from the setting")
        }
        Source::File(f) => {
            tracing::info!(keys = ?keyring.ids(), file = %f.display(), "encryption keyring from a file")
        }
        Source::Generated(f) => {
            tracing::info!(file = %f.display(), "created an encryption key file (0600); back it up apart from the data")
        }
    }
    let report = sealing::walk(store.sealed_rows(), &keyring, Walk::SealPlain)
        .await
        .with_context(|| format!("sealing stored secrets; check {SETTINGS}"))?;
    if report.rewritten > 0 {
        tracing::info!(
            rows = report.rewritten,
            key = keyring.current_id(),
            "sealed rows written before encryption at rest"
        );
    }
    store.set_keyring(Arc::new(keyring));
    Ok(())
}

/// Fails, naming the settings, when the store holds sealed values (nothing is written).
async fn refuse_if_sealed(store: &AnyStore, missing_file: Option<&Path>) -> anyhow::Result<()> {
    let seen = sealing::survey(store.sealed_rows()).await?;
    let ids: Vec<_> = seen.iter().filter(|id| *id != "plaintext").collect();
    if ids.is_empty() {
        return Ok(());
    }
    let file = missing_file
        .map(|f| format!(", and the embedded key file {} is missing", f.display()))
        .unwrap_or_default();
    bail!(
        "the database holds secrets sealed under encryption key id(s) {ids:?} but no \
         encryption key is configured{file}. Set {SETTINGS} to the keyring that holds those \
         ids (or restore the key file). Nothing was changed"
    )
}

/// `hookline admin rotate-encryption-key`: re-seals every row under the current key.
pub async fn rotate(store: &AnyStore, config: &Config, at: &StoreAt) -> anyhow::Result<String> {
    let keyring = match (configured(config)?, at) {
        (Some((keyring, _)), _) => keyring,
        (None, StoreAt::Sqlite(dir)) if dir.join(KEY_FILE).exists() => {
            read_key_file(&dir.join(KEY_FILE))?
        }
        _ => bail!("no encryption key configured; set {SETTINGS}, the new key first"),
    };
    let report = sealing::walk(store.sealed_rows(), &keyring, Walk::Rotate)
        .await
        .with_context(|| format!("re-sealing stored secrets; check {SETTINGS}"))?;
    Ok(summary(&keyring, &report))
}

fn summary(keyring: &Keyring, report: &SealReport) -> String {
    let current = keyring.current_id();
    let unused: Vec<_> = keyring.ids().into_iter().skip(1).collect();
    if report.rows == 0 {
        return format!("no stored secrets yet; new ones are sealed under key {current:?}.");
    }
    let before: Vec<_> = report.seen.iter().map(String::as_str).collect();
    let mut text = format!(
        "re-sealed {} of {} rows under key {current:?} (values were under: {}).",
        report.rewritten,
        report.rows,
        before.join(", ")
    );
    if !unused.is_empty() {
        text.push_str(&format!(
            " Every row is now sealed under {current:?}: once every process runs with it, \
             key(s) {unused:?} can be removed from the keyring."
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretSetting;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "hookline-encryption-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rand_suffix() -> u64 {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn the_key_setting_is_never_shown() {
        let spec = Keyring::generate_spec("k1").unwrap().to_string();
        let config = Config {
            encryption_key: Some(SecretSetting(spec.clone())),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains(spec.trim()), "{shown}");
        assert!(configured(&config).unwrap().is_some());
    }

    #[test]
    fn both_settings_are_refused() {
        let config = Config {
            encryption_key: Some(SecretSetting("k1:x".into())),
            encryption_key_file: Some("/nonexistent".into()),
            ..Config::default()
        };
        let err = configured(&config).err().expect("refused").to_string();
        assert!(err.contains("set one of them"), "{err}");
    }

    #[test]
    fn a_generated_key_file_is_private_and_never_overwritten() {
        let dir = temp_dir();
        let file = dir.join(KEY_FILE);
        let ring = generate_key_file(&file).unwrap();
        assert_eq!(ring.ids(), vec![GENERATED_KEY_ID]);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = std::fs::read(&file).unwrap();
        assert!(generate_key_file(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), before);
        assert_eq!(read_key_file(&file).unwrap().ids(), vec!["k1"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
