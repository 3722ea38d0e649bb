//! GitOps promotion, the library half: render an environment's serving
//! folder for a promotion, and land it in the GitOps repository as one
//! auditable commit (or roll it back with a revert commit).
//!
//! - [`render`]: the serving folder `envs/{env}/{model}/` (vLLM Deployment or,
//!   in prod, an Argo Rollouts canary with its Prometheus analysis; Service;
//!   kustomization; model card), as pure, deterministic functions;
//! - [`remote`]: which repository URLs and branches are accepted at all;
//! - [`credentials`]: git credentials from the Secret the promotion names;
//! - [`message`]: commit messages and the trailers that make writes idempotent;
//! - [`repo`]: the git2 writer (fetch, commit, push with retry, revert);
//! - [`error`]: its errors, sorted by what the reconciler does about them.
//!
//! The ModelPromotion reconciler drives these; the writer is blocking and
//! meant for `tokio::task::spawn_blocking`.

pub mod credentials;
pub mod error;
pub mod message;
pub mod remote;
pub mod render;
pub mod repo;
mod transport;

pub use credentials::{CredentialsError, GitCredentials, KnownHosts, SshKey};
pub use error::GitOpsError;
pub use message::PromotionId;
pub use render::{
    AnalysisThresholds, RenderError, RenderedFile, RenderedFolder, ServingInputs, ServingSettings,
    render_serving_folder,
};
pub use repo::{
    BeforePush, CommitOutcome, CommitStatus, GitTarget, GitWriter, GitWriterConfig,
    PromotionCommit, PushAttempt, RevertRequest,
};
