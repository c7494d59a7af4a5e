//! What an operator meets when deploying and running Hookline: commands that need only
//! the database, a process that runs part of the cluster (its log, and its answer to calls
//! for services it does not run), a refused broker login, and logs written to a file.

#[macro_use]
mod support;

use std::process::{Output, Stdio};
use std::time::Duration;

use hookline_proto::v1 as pb;
use hookline_proto::v1::registry_service_client::RegistryServiceClient;
use support::{BIN, Backend, Env, authed};
use tokio::process::Command;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `hookline <args>` with the test's settings minus the broker URL, as the chart's
/// migration Job does.
async fn database_only(env: &Env, args: &[&str]) -> Output {
    env.command()
        .env_remove("HOOKLINE_AMQP_URL")
        .args(args)
        .output()
        .await
        .expect("run hookline")
}

async fn migrate_and_create_key_need_only_the_database(backend: Backend) {
    let env = Env::with(backend).await;
    let out = database_only(&env, &["migrate"]).await;
    assert!(out.status.success(), "migrate: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("migrations applied"));
    let out = database_only(&env, &["admin", "create-key", "--name", "ops"]).await;
    assert!(out.status.success(), "create-key: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let token = stdout
        .lines()
        .find(|l| l.starts_with("hl_"))
        .unwrap_or_else(|| panic!("no token in {stdout:?}"))
        .to_string();
    // The key landed in the database the full server uses.
    let server = env.serve("all").await;
    let mut registry = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .expect("connect");
    registry
        .list_tenants(authed(pb::ListTenantsRequest::default(), &token))
        .await
        .expect("the key made with the database alone works");
    server.terminate().await;
    env.finish().await;
}

on_both_backends!(migrate_and_create_key_need_only_the_database);

#[tokio::test]
async fn a_call_to_a_service_run_elsewhere_says_where_it_runs() {
    let env = Env::new().await;
    let token = env.admin_key().await;
    let server = env.serve("dispatcher").await;
    let mut registry = RegistryServiceClient::connect(server.grpc.clone())
        .await
        .expect("connect");
    let status = registry
        .list_tenants(authed(pb::ListTenantsRequest::default(), &token))
        .await
        .expect_err("this process runs no registry");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(
        status.message(),
        "this process runs dispatcher; registry runs elsewhere: point the client at a process \
         started with --services registry (or all)"
    );
    // The CLI passes the message on.
    let out = Command::new(BIN)
        .args([
            "--server",
            &server.grpc,
            "--token",
            &token,
            "tenants",
            "list",
        ])
        .output()
        .await
        .expect("run the CLI");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("this process runs dispatcher; registry runs elsewhere"),
        "{}",
        text(&out.stderr)
    );
    server.terminate().await;
    env.finish().await;
}

/// Starts `serve --services <services>` at log level info with its logs in a file, and
/// returns them once the process has logged that it serves.
async fn logs_of_a_start(env: &Env, services: &str) -> String {
    let path = env.data_dir.with_extension("stderr.log");
    let file = std::fs::File::create(&path).expect("create the log file");
    let server = env
        .serve_logging(services, &[("HOOKLINE_LOG", "info")], Stdio::from(file))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let logs = std::fs::read_to_string(&path).unwrap_or_default();
        if logs.contains("serving") {
            break logs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no \"serving\" line in 30 s: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    server.terminate().await;
    let _ = std::fs::remove_file(&path);
    logs
}

#[tokio::test]
async fn a_process_running_part_of_the_cluster_names_what_runs_elsewhere() {
    let env = Env::new().await;
    let logs = logs_of_a_start(&env, "ingest,retry").await;
    assert!(
        logs.contains(
            "this process runs ingest,retry; the cluster also needs registry, dispatcher \
             running in other processes"
        ),
        "{logs}"
    );
    env.finish().await;
}

#[tokio::test]
async fn logs_to_a_file_are_plain_and_free_of_routine_notices() {
    let env = Env::new().await;
    // Migrated once already, so this start's migration finds every table in place.
    env.admin_key().await;
    let logs = logs_of_a_start(&env, "all").await;
    assert!(!logs.contains('\u{1b}'), "ANSI escape codes in {logs:?}");
    assert!(
        !logs.contains("_sqlx_migrations"),
        "PostgreSQL's notice is logged: {logs}"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_refused_rabbitmq_login_is_one_clear_line() {
    let env = Env::new().await;
    let run = env
        .command()
        .env(
            "HOOKLINE_AMQP_URL",
            "amqp://guest:not-the-password@127.0.0.1:5672/%2f",
        )
        .env("HOOKLINE_LOG", "info")
        .args(["serve", "--grpc-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("a refused login ends the start at once")
        .expect("run hookline");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "RabbitMQ refused the login for user guest on 127.0.0.1:5672: check amqp_url"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("refused the login").count(), 1, "{stderr}");
    assert!(
        !stderr.contains("ERROR"),
        "error logs besides the message: {stderr}"
    );
    assert!(!stderr.contains("after waiting"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "{stderr}");
    env.finish().await;
}
