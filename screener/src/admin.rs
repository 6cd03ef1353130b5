//! The admin socket: a Unix stream socket over which the CLI asks the
//! running daemon to change or show its state, so the store and the kernel
//! maps have one writer and never disagree. It is bound mode 0600 and
//! opened to `daemon.admin_group` (mode 0660) once the daemon hands it to
//! `daemon.user`: whoever may connect may change every verdict.
//!
//! Protocol: one JSON request line, one JSON response line, then close.
//! Listings, which may hold a million entries, stream instead: the
//! response line says `"stream": true`, then one `{"row": ...}` line per
//! entry, then `{"end": {"rows": N}}` (with `"error"` when the listing
//! broke off). Neither side ever holds the whole listing.

use std::{
    future::Future,
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
    /// The fleet as this node sees it, with the nodes that beat recently.
    ClusterStatus,
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
    /// Rows follow, one per line, then an end line (see the module docs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// What the daemon sends back for one request.
pub enum Reply {
    /// One response line.
    One(Response),
    /// A streamed listing: chunks of row lines from a producer, then its
    /// end.
    Rows(tokio::sync::mpsc::Receiver<Rows>),
}

/// One message from a listing's producer to the socket.
pub enum Rows {
    /// Whole `{"row": ...}` lines, newline-terminated.
    Chunk(Vec<u8>),
    /// The listing is over: how many rows, and why it broke off if it did.
    End {
        /// Rows sent.
        rows: u64,
        /// What stopped it early.
        error: Option<String>,
    },
}

/// The last line of a streamed listing.
#[derive(Debug, Serialize, Deserialize)]
struct End {
    /// Rows sent.
    rows: u64,
    /// Why the listing broke off, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A line of a streamed listing, as the client reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Row(serde_json::Value),
    End(End),
}

/// Appends `{"row": row}` and a newline to `buf`.
pub fn push_row(buf: &mut Vec<u8>, row: &impl Serialize) {
    #[derive(Serialize)]
    struct RowLine<'a, T> {
        row: &'a T,
    }
    // Rows are plain data: serialising them cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &RowLine { row });
    buf.push(b'\n');
}

impl Response {
    pub fn ok(data: impl Serialize) -> Response {
        Response {
            ok: true,
            error: None,
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
            stream: false,
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            data: serde_json::Value::Null,
            stream: false,
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
    let (resp, _) = exchange(path, req).await?;
    if resp.stream {
        return Err(AdminError::Protocol {
            path: path.to_owned(),
            detail: "a listing where one answer was expected".into(),
        });
    }
    Ok(resp)
}

/// Sends a listing request; `on_row` gets each row as it arrives. Returns
/// the response line (a refusal has `ok == false` and no rows) and the
/// number of rows.
pub async fn call_rows(
    path: &Path,
    req: &Request,
    mut on_row: impl FnMut(serde_json::Value),
) -> Result<(Response, u64), AdminError> {
    let protocol = |detail: String| AdminError::Protocol {
        path: path.to_owned(),
        detail,
    };
    let (resp, mut reader) = exchange(path, req).await?;
    if !resp.stream {
        return Ok((resp, 0));
    }
    let mut line = String::new();
    let mut rows = 0;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(|source| AdminError::Io {
                path: path.to_owned(),
                source,
            })?;
        if n == 0 {
            return Err(protocol(format!(
                "the listing ended after {rows} rows without its end line"
            )));
        }
        match serde_json::from_str::<Line>(&line) {
            Ok(Line::Row(v)) => {
                rows += 1;
                on_row(v);
            }
            Ok(Line::End(end)) => {
                if let Some(e) = end.error {
                    return Ok((
                        Response::err(format!("listing broke off after {rows} rows: {e}")),
                        rows,
                    ));
                }
                if end.rows != rows {
                    return Err(protocol(format!(
                        "{rows} rows arrived, the daemon sent {}",
                        end.rows
                    )));
                }
                return Ok((resp, rows));
            }
            Err(e) => {
                return Err(protocol(format!(
                    "{e}: {:?}",
                    line.chars().take(200).collect::<String>()
                )))
            }
        }
    }
}

/// Sends `req`, reads the response line; the reader stays positioned after
/// it for streamed rows.
async fn exchange(
    path: &Path,
    req: &Request,
) -> Result<(Response, BufReader<tokio::net::unix::OwnedReadHalf>), AdminError> {
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
    let mut reader = BufReader::new(r);
    let mut answer = String::new();
    reader.read_line(&mut answer).await.map_err(io)?;
    let resp = serde_json::from_str(&answer).map_err(|e| AdminError::Protocol {
        path: path.to_owned(),
        detail: format!("{e}: {:?}", answer.chars().take(200).collect::<String>()),
    })?;
    Ok((resp, reader))
}

/// Handles one request.
pub type Handler = Arc<dyn Fn(Request) -> BoxFuture<'static, Reply> + Send + Sync>;

/// The bound admin socket.
pub struct Bound {
    /// Accepting nothing until the daemon serves.
    pub listener: UnixListener,
    /// The socket's directory when this bind created it (mode 0700): the
    /// daemon hands it to its user and the admin group, an existing one
    /// stays as it is.
    pub created_dir: Option<PathBuf>,
}

/// Binds the admin socket: creates its directory (0700 when new), refuses
/// when another daemon answers there, replaces a stale socket file.
pub async fn bind(path: &Path) -> Result<Bound, AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    let mut created_dir = None;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
            created_dir = Some(dir.to_owned());
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
    Ok(Bound {
        listener,
        created_dir,
    })
}

/// Serves one admin connection: one request, one reply. A client that
/// sends nothing within a minute is dropped, and so is one that has not
/// sent its request when `stop` resolves (a request already read is
/// answered).
pub async fn connection(stream: UnixStream, handler: Handler, stop: impl Future<Output = ()>) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r);
    let read = tokio::select! {
        read = tokio::time::timeout(Duration::from_secs(60), r.read_line(&mut line)) => read,
        () = stop => return,
    };
    let reply = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => handler(req).await,
            Err(e) => Reply::One(Response::err(format!("bad request: {e}"))),
        },
        Ok(Err(e)) => Reply::One(Response::err(format!("reading request: {e}"))),
        Err(_) => return,
    };
    let _ = write_reply(&mut w, reply).await;
}

/// Writes `reply`; a client that goes away stops a streamed listing (its
/// producer sees the channel closed).
async fn write_reply(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    reply: Reply,
) -> std::io::Result<()> {
    match reply {
        Reply::One(resp) => w.write_all(line(&resp).as_bytes()).await,
        Reply::Rows(mut rx) => {
            let head = Response {
                stream: true,
                ..Response::ok(serde_json::Value::Null)
            };
            w.write_all(line(&head).as_bytes()).await?;
            while let Some(msg) = rx.recv().await {
                match msg {
                    Rows::Chunk(bytes) => w.write_all(&bytes).await?,
                    Rows::End { rows, error } => {
                        #[derive(Serialize)]
                        struct EndLine {
                            end: End,
                        }
                        let end = EndLine {
                            end: End { rows, error },
                        };
                        return w.write_all(line(&end).as_bytes()).await;
                    }
                }
            }
            // The producer died without its end line.
            let end = serde_json::json!({ "end": { "rows": 0, "error": "the listing stopped" } });
            w.write_all(line(&end).as_bytes()).await
        }
    }
}

/// `v` as one JSON line.
fn line(v: &impl Serialize) -> String {
    let mut out = serde_json::to_string(v).expect("admin lines serialize");
    out.push('\n');
    out
}
