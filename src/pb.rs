//! The generated `eventbus.v1` wire types and gRPC stubs, in one place. Nothing outside the
//! service adapter ([`crate::service`]) and the SDK ([`crate::sdk`]) should need them.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("eventbus.v1");

/// The encoded descriptor set of `eventbus.v1` (and what it imports), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/eventbus_descriptor.bin"));

/// The protobuf codec of every `eventbus.v1` stub (set in `build.rs` with `codec_path`): tonic's
/// prost codec with a smaller starting buffer per stream. Each open stream (every subscription)
/// keeps one encode and one decode buffer; tonic's 8 KiB default made idle subscriptions cost
/// about 10 KB each. Buffers still grow to fit any message.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Starting size of a stream's encode and decode buffers.
    pub const STREAM_BUFFER_BYTES: usize = 256;
    /// tonic's default: how much is encoded before the stream yields to the transport.
    const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

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

    /// The buffer settings of every stream's encoder and decoder.
    pub fn settings() -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
    }

    impl<T, U> Codec for BusCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(settings())
        }
    }
}
