//! A hostile storage server: the fuzzer's bytes are what an NBD server or an iSCSI target
//! sends back while six requests are in flight (reads of one and two segments, writes, a
//! flush, a discard), cut into pieces of varying size. The first byte picks the protocol.
//! The parser must complete only requests it knows, stay inside its input and the requests'
//! buffers, or give up on the connection; never panic. The parser runs on a thread confined
//! as a VMM's virtio thread with remote disks (whose workers it starts, and whose filter they
//! inherit): a system call that filter lacks is a crash here.
#![no_main]

#[path = "common.rs"]
mod common;

use bexar_devices::block::remote::fuzz::{server_bytes, Kind};
use bexar_vmm::threads::ThreadKind;
use common::confined;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: common::jail_process(), |data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let kind = if which & 1 == 0 { Kind::Nbd } else { Kind::Iscsi };
    let rest = rest.to_vec();
    confined(ThreadKind::Virtio, true, move || {
        server_bytes(kind, &rest);
    });
});
