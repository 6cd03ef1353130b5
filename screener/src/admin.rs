//! The admin socket: a Unix stream socket (mode 0600) over which the CLI
//! asks the running daemon to change or show its state, so the store and
//! the kernel maps have one writer and never disagree.
//!
//! Protocol: one JSON request line, one JSON response line, then close.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

/// A request from the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    BlockAdd {
        nets: Vec<String>,
        /// Seconds; `None` = `verdict.block_ttl`.
        ttl: Option<u64>,
        reason: Option<String>,
    },
    BlockDel {
        nets: Vec<String>,
    },
    BlockList,
    AllowAdd {
        nets: Vec<String>,
    },
    AllowDel {
        nets: Vec<String>,
    },
    AllowList,
    Stats,
    XdpStatus,
    XdpDetach,
    CacheList,
    CacheShow {
        ip: String,
    },
    CachePurge {
        ip: Option<String>,
    },
    Import {
        /// Absolute path, read by the daemon.
        file: PathBuf,
        format: String,
        ttl: Option<u64>,
        reason: Option<String>,
    },
}

/// The daemon's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Response {
        Response {
            ok: true,
            error: None,
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            data: serde_json::Value::Null,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the daemon is not running (nothing listens on {path}); start it with `screener run`")]
    NotRunning { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path}: bad answer from the daemon: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("another daemon is already serving {path}")]
    InUse { path: PathBuf },
}

/// Sends one request to the daemon and waits for its answer.
pub async fn call(path: &Path, req: &Request) -> Result<Response, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AdminError::NotRunning {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    w.write_all(line.as_bytes()).await.map_err(io)?;
    w.shutdown().await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(r).read_line(&mut answer).await.map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| AdminError::Protocol {
        path: path.to_owned(),
        detail: format!("{e}: {:?}", answer.chars().take(200).collect::<String>()),
    })
}

/// Handles one request.
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture<'static, Response> + Send + Sync>;

/// Binds the admin socket: creates its directory (0700 when new), refuses
/// when another daemon answers there, replaces a stale socket file.
pub async fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Handler) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("admin socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            // A client that sends nothing within a minute is dropped.
            let read = tokio::time::timeout(
                Duration::from_secs(60),
                BufReader::new(r).read_line(&mut line),
            )
            .await;
            let resp = match read {
                Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handler(req).await,
                    Err(e) => Response::err(format!("bad request: {e}")),
                },
                Ok(Err(e)) => Response::err(format!("reading request: {e}")),
                Err(_) => return,
            };
            let mut out = serde_json::to_string(&resp).expect("responses serialize");
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}
