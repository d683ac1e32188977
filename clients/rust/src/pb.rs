//! The generated `eventbus.v1` wire types and client stubs (from `proto/eventbus/v1`), shared with
//! the bus's crate, which adds its server stubs over the same types.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("eventbus.v1");

/// The protobuf codec of the client stubs (set in `build.rs` with `codec_path`): tonic's prost
/// codec with a smaller starting buffer per stream, since every open subscription keeps one
/// encode and one decode buffer (tonic's 8 KiB default). Buffers still grow to fit any message.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::ProstCodec;

    /// Starting size of a stream's encode and decode buffers.
    pub const STREAM_BUFFER_BYTES: usize = 256;
    /// tonic's default: how much is encoded before the stream yields to the transport.
    pub const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

    /// The buffer settings of every stream's encoder and decoder.
    pub fn settings() -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
    }

    /// See the module docs.
    #[derive(Debug, Clone)]
    pub struct ClientCodec<T, U> {
        _types: PhantomData<(T, U)>,
    }

    impl<T, U> Default for ClientCodec<T, U> {
        fn default() -> Self {
            ClientCodec {
                _types: PhantomData,
            }
        }
    }

    impl<T, U> Codec for ClientCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
        type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(settings())
        }
    }
}
