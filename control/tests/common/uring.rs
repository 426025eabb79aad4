//! Running one test body on both data planes. Shared by the e2e tests (through `common`) and
//! the loopback tests (which include this file alone).

/// Whether the io_uring variant of a test can run here. When the probe fails, under CI
/// (`CI=true`) the test panics with the probe's cause, since a backend skipped there would be
/// an untested one; elsewhere it prints why the test is skipped and returns false.
pub fn require_uring() -> bool {
    match warren_dataplane::probe() {
        Ok(_) => true,
        Err(cause) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring is unavailable and CI=true, so the uring variant fails instead of skipping: {cause}"
            );
            eprintln!("skipped: io_uring is unavailable here ({cause}); with CI=true this fails");
            false
        }
    }
}

/// `body => name_compat, name_uring;` declares two tests that run the async `body(Backend)`:
/// one on the compat backend, one on io_uring (after [`require_uring`], which must be in scope).
macro_rules! on_both_backends {
    ($($body:ident => $compat:ident, $uring:ident;)+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $compat() {
            $body(warren::backend::Backend::Compat).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $uring() {
            if require_uring() {
                $body(warren::backend::Backend::Uring).await;
            }
        }
    )+};
}
