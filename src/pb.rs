//! The `eventbus.v1` wire types and gRPC stubs, in one place: the message types and client stubs
//! of the `eventbus-client` crate (one type on both sides), and the server stubs generated here
//! over them (`build.rs`, `extern_path`). Nothing outside the service adapter
//! ([`crate::service`]) and the SDK ([`crate::sdk`]) should need them.
#![allow(missing_docs, clippy::all)]

pub use eventbus_client::pb::*;

tonic::include_proto!("eventbus.v1");

/// The encoded descriptor set of `eventbus.v1` (and what it imports), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/eventbus_descriptor.bin"));

/// The protobuf codec of the server stubs (set in `build.rs` with `codec_path`): tonic's
/// prost codec with a smaller starting buffer per stream (the client crate's settings). Each open stream (every subscription)
/// keeps one encode and one decode buffer; tonic's 8 KiB default made idle subscriptions cost
/// about 10 KB each. Buffers still grow to fit any message.
///
/// Its decoder ([`BusDecoder`]) answers a request that is not valid protobuf with
/// INVALID_ARGUMENT (reason `malformed-request`) naming the message and the field, where prost's
/// codec answers INTERNAL with no reason: bad bytes from a client are the client's error.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
    use tonic::Status;
    use tonic_prost::{ProstCodec, ProstEncoder};

    use crate::error::BusError;

    pub use eventbus_client::pb::codec::{settings, STREAM_BUFFER_BYTES};

    /// See the module docs.
    #[derive(Debug, Clone)]
    pub struct BusCodec<T, U> {
        _types: PhantomData<(T, U)>,
    }

    impl<T, U> Default for BusCodec<T, U> {
        fn default() -> Self {
            BusCodec {
                _types: PhantomData,
            }
        }
    }

    impl<T, U> Codec for BusCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = BusDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            BusDecoder::default()
        }
    }

    /// Decodes `U` with prost. A decode failure of a request (a message type whose name ends in
    /// `Request`: what the server's stubs decode) is a
    /// [`BusError::MalformedRequest`]; of a response, INTERNAL as in tonic's prost codec, since
    /// then the bus is at fault, not the caller.
    #[derive(Debug)]
    pub struct BusDecoder<U> {
        _type: PhantomData<U>,
    }

    impl<U> Default for BusDecoder<U> {
        fn default() -> Self {
            BusDecoder { _type: PhantomData }
        }
    }

    impl<U: prost::Message + Default> Decoder for BusDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            U::decode(src).map(Some).map_err(decode_error::<U>)
        }

        fn buffer_settings(&self) -> BufferSettings {
            settings()
        }
    }

    /// The status of a message of type `U` that failed to decode. Built only on that path.
    pub fn decode_error<U>(error: prost::DecodeError) -> Status {
        let name = std::any::type_name::<U>();
        let name = name.rsplit("::").next().unwrap_or(name);
        if !name.ends_with("Request") {
            return Status::internal(error.to_string());
        }
        // prost's text is "failed to decode Protobuf message: <field path>: <what>"; the
        // variant's message already says it failed to decode.
        let text = error.to_string();
        let detail = text
            .strip_prefix("failed to decode Protobuf message: ")
            .unwrap_or(&text);
        Status::from(BusError::MalformedRequest {
            message: format!("eventbus.v1.{name}"),
            detail: detail.to_owned(),
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_request_that_does_not_decode_is_the_callers_error() {
            let bytes = [0x0a, 0x05, b'a'];
            let error = <crate::pb::AckRequest as prost::Message>::decode(&bytes[..]).unwrap_err();
            let status = decode_error::<crate::pb::AckRequest>(error);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().starts_with(
                    "request eventbus.v1.AckRequest failed to decode: AckRequest.group"
                ),
                "{}",
                status.message()
            );
            assert_eq!(
                status.metadata().get("eventbus-error").unwrap(),
                "malformed-request"
            );
        }

        #[test]
        fn a_response_that_does_not_decode_is_internal() {
            let bytes = [0x0a, 0x05, b'a'];
            let error = <crate::pb::AckResponse as prost::Message>::decode(&bytes[..]).unwrap_err();
            let status = decode_error::<crate::pb::AckResponse>(error);
            assert_eq!(status.code(), tonic::Code::Internal);
        }
    }
}
