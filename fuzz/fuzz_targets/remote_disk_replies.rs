//! A hostile storage server: the fuzzer's bytes are what an NBD server or an iSCSI target
//! sends back while six requests are in flight (reads of one and two segments, writes, a
//! flush, a discard), cut into pieces of varying size. The first byte picks the protocol.
//! The parser must complete only requests it knows, stay inside its input and the requests'
//! buffers, or give up on the connection; never panic.
#![no_main]

use bexar_devices::block::remote::fuzz::{server_bytes, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let kind = if which & 1 == 0 { Kind::Nbd } else { Kind::Iscsi };
    server_bytes(kind, rest);
});
