//! A request body that watches the gRPC framing as it streams through: it refuses a
//! message whose declared length is over the method's limit before any of it is
//! buffered, and reports when the body has been read to its end (a complete request,
//! which is what lifts a connection's first-request deadline, see [`crate::conn`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hookline_core::fmt::thousands;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

/// How many bytes one request message of a method may have, and what says so.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimit {
    /// `None` for the methods under the default limit.
    pub method: Option<&'static str>,
    pub max_bytes: usize,
    /// The setting that raises it, if any.
    pub setting: Option<&'static str>,
}

/// The 5-byte gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Wraps a request body; see the module comment.
pub struct CheckedBody<B> {
    inner: B,
    limit: Option<MessageLimit>,
    prefix: [u8; PREFIX],
    prefix_filled: usize,
    /// Bytes of the current message still to come.
    in_message: usize,
    on_end: Option<Arc<ConnState>>,
}

impl<B> CheckedBody<B> {
    pub fn new(inner: B, limit: Option<MessageLimit>, on_end: Option<Arc<ConnState>>) -> Self {
        Self {
            inner,
            limit,
            prefix: [0; PREFIX],
            prefix_filled: 0,
            in_message: 0,
            on_end,
        }
    }

    /// Follows the framing through `chunk`; an error for a message over the limit.
    fn inspect(&mut self, mut chunk: &[u8]) -> Result<(), Status> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        while !chunk.is_empty() {
            if self.in_message > 0 {
                let n = self.in_message.min(chunk.len());
                self.in_message -= n;
                chunk.advance(n);
                continue;
            }
            let n = (PREFIX - self.prefix_filled).min(chunk.len());
            self.prefix[self.prefix_filled..self.prefix_filled + n].copy_from_slice(&chunk[..n]);
            self.prefix_filled += n;
            chunk.advance(n);
            if self.prefix_filled == PREFIX {
                self.prefix_filled = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                if len > limit.max_bytes {
                    return Err(too_large(limit, len));
                }
                self.in_message = len;
            }
        }
        Ok(())
    }

    fn ended(&mut self) {
        if let Some(conn) = self.on_end.take() {
            conn.request_completed();
        }
    }
}

fn too_large(limit: MessageLimit, len: usize) -> Status {
    let what = limit
        .method
        .map(|m| format!("the {m} request message"))
        .unwrap_or_else(|| "the request message".into());
    let raise = limit
        .setting
        .map(|s| format!(" (setting {s})"))
        .unwrap_or_default();
    Status::invalid_argument(format!(
        "{what} is {} bytes; the limit is {} bytes{raise}",
        thousands(len as u64),
        thousands(limit.max_bytes as u64)
    ))
}

impl<B> Body for CheckedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.inspect(data)
                {
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
                if this.inner.is_end_stream() {
                    this.ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.ended();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What is known about a connection, shared with its requests (through
/// [`crate::conn::ConnInfo`] in their extensions): a [`CheckedBody`] read to its end marks
/// a request complete, which [`crate::conn`] reads to lift the first-request deadline.
#[derive(Debug, Default)]
pub struct ConnState {
    completed_request: AtomicBool,
}

impl ConnState {
    pub fn request_completed(&self) {
        self.completed_request.store(true, Ordering::Release);
    }

    pub(crate) fn has_completed_request(&self) -> bool {
        self.completed_request.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn follows_messages_split_anywhere() {
        let limit = MessageLimit {
            method: Some("Publish"),
            max_bytes: 10,
            setting: None,
        };
        let mut stream = frame(10);
        stream.extend(frame(3));
        stream.extend(frame(11));
        for split in 1..stream.len() {
            let mut body = CheckedBody::new((), Some(limit), None);
            let (a, b) = stream.split_at(split);
            let result = body.inspect(a).and_then(|_| body.inspect(b));
            let err = result.expect_err("the third message is over the limit");
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert_eq!(
                err.message(),
                "the Publish request message is 11 bytes; the limit is 10 bytes"
            );
        }
    }
}
