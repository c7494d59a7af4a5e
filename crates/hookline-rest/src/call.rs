//! One gRPC call (unary or server-streaming) with an already-encoded request, answered
//! with the encoded response: the REST side calls the very services (gate, limits,
//! handlers) every gRPC client calls — in process, on their [`Routes`], with the caller
//! it admitted in the request's extensions (the gate's trusted in-process path) — and
//! never decodes a message it has not checked.

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::service::Routes;
use tonic::{Request, Status};

/// Passes encoded messages through unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls `path` (`/hookline.v1.IngestService/Publish`) on `services`.
pub async fn unary(
    services: Routes,
    path: &str,
    request: Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    let (mut grpc, path) = ready(services, path).await?;
    grpc.unary(request, path, RawCodec).await
}

/// Calls the server-streaming method `path` on `services`.
pub async fn server_streaming(
    services: Routes,
    path: &str,
    request: Request<Bytes>,
) -> Result<tonic::Response<tonic::Streaming<Bytes>>, Status> {
    let (mut grpc, path) = ready(services, path).await?;
    grpc.server_streaming(request, path, RawCodec).await
}

async fn ready(
    services: Routes,
    path: &str,
) -> Result<(tonic::client::Grpc<Routes>, http::uri::PathAndQuery), Status> {
    let path = http::uri::PathAndQuery::try_from(path)
        .map_err(|e| Status::internal(format!("bad method path {path}: {e}")))?;
    let mut grpc = tonic::client::Grpc::new(services)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the gRPC services are not reachable: {e}")))?;
    Ok((grpc, path))
}
