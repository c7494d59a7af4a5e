//! Hookline's public gRPC API, generated from `proto/hookline/v1` at build time.
//!
//! Every client and server of Hookline uses these types; the `.proto` files are the
//! contract. `FILE_DESCRIPTOR_SET` feeds gRPC server reflection so that `grpcurl` works
//! without the `.proto` files at hand.

pub mod codec;

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("hookline.v1");
}

/// The encoded descriptors of every `hookline.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hookline_descriptor");
