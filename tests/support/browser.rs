//! A real Chromium for the console tests, driven over WebDriver (`chromedriver` and the
//! `fantoccini` crate). Debian's `chromium` and `chromium-driver` are installed with
//! apt-get when absent, so the tests run on a fresh machine. Screenshots are written
//! under `target/console-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use tokio::process::{Child, Command};

use super::private::free_port;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long any one wait for the page may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// Installs Debian's Chromium and its WebDriver when they are missing.
fn ensure_installed() {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return;
    }
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            std::process::Command::new("apt-get")
        } else {
            let mut c = std::process::Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let packages = [
        "install",
        "-y",
        "--no-install-recommends",
        "chromium",
        "chromium-driver",
    ];
    if !apt(&packages) {
        assert!(
            apt(&["update"]),
            "apt-get update failed; install chromium and chromium-driver"
        );
        assert!(
            apt(&packages),
            "cannot install chromium and chromium-driver with apt-get"
        );
    }
}

/// Chromium under chromedriver; both end when this is dropped.
pub struct Browser {
    pub client: Client,
    _driver: Child,
    shots: PathBuf,
}

impl Browser {
    pub async fn start() -> Browser {
        tokio::task::spawn_blocking(ensure_installed)
            .await
            .expect("install chromium");
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--window-size=1400,1000", "--disable-gpu"],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + WAIT;
        // chromedriver accepts sessions once it listens: connect until it does.
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot open a WebDriver session on chromedriver: {e}"),
            }
        };
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
        std::fs::create_dir_all(&shots).expect("create target/console-screenshots");
        Browser {
            client,
            _driver: driver,
            shots,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The element for `css`, waiting for it to appear.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.wait_for(Locator::Css(css)).await
    }

    /// The element for `xpath`, waiting for it to appear.
    pub async fn find_xpath(&self, xpath: &str) -> fantoccini::elements::Element {
        self.wait_for(Locator::XPath(xpath)).await
    }

    async fn wait_for(&self, locator: Locator<'_>) -> fantoccini::elements::Element {
        match self.client.wait().at_most(WAIT).for_element(locator).await {
            Ok(element) => element,
            Err(e) => panic!(
                "no element {locator:?} within {WAIT:?}: {e}; page {}: {}",
                self.url().await,
                self.source().await
            ),
        }
    }

    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("element text")
    }

    pub async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .map(|v| v.len())
            .unwrap_or(0)
    }

    /// Types `value` into the field `css`, replacing what it held.
    pub async fn fill(&self, css: &str, value: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("clear field");
        field.send_keys(value).await.expect("type into field");
    }

    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    pub async fn source(&self) -> String {
        self.client.source().await.unwrap_or_default()
    }

    /// Reloads the page until `done` holds for its source; panics after [`WAIT`].
    pub async fn reload_until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let page = self.source().await;
            if done(&page) {
                return page;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not {what} within {WAIT:?}: {page}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.client.refresh().await.expect("reload");
        }
    }

    /// Saves the page as `target/console-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("write screenshot");
    }

    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}
