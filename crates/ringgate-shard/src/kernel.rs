//! What the running kernel offers, checked once before any shard starts.
//!
//! Required (refused with a one-line reason): Linux 6.0 (multishot receive with
//! buffer select; multishot accept into direct descriptors, provided-buffer
//! rings and sparse file tables came in 5.19), io_uring enabled, and every
//! opcode the shards submit. Optional, used when present: multishot timeouts
//! (6.4; else the tick is a re-armed one-shot timeout), incremental buffer
//! consumption (6.12; detected when the buffer ring is registered), and
//! SINGLE_ISSUER/DEFER_TASKRUN (detected when the ring is built).
//!
//! Owns detection only; the shard picks its fallbacks from [`Features`].

use io_uring::opcode;

use crate::sys;

/// The oldest kernel with every feature the shards require.
pub(crate) const KERNEL_MIN: (u32, u32) = (6, 0);

/// The first kernel with multishot timeouts (IORING_TIMEOUT_MULTISHOT).
const MULTISHOT_TIMEOUT_MIN: (u32, u32) = (6, 4);

/// Optional kernel features, found at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The shard's tick can be one multishot timeout.
    pub multishot_timeout: bool,
}

/// Checks the kernel; `Err` is the one-line reason it cannot run ringgate.
pub(crate) fn check() -> Result<Features, String> {
    let (release, version) = sys::kernel_version();
    if version < KERNEL_MIN {
        return Err(format!(
            "ringgate needs Linux {}.{} or newer (io_uring multishot recv with provided buffers); this kernel is {release}",
            KERNEL_MIN.0, KERNEL_MIN.1
        ));
    }
    let ring = io_uring::IoUring::new(8).map_err(|e| {
        format!("io_uring is unavailable ({e}); is it disabled by kernel.io_uring_disabled or a seccomp profile?")
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e} (needs Linux 5.6)"))?;
    // Every opcode a shard submits; the multishot and fixed-file forms are
    // flags of these, covered by the version check above.
    let needed = [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::Read::CODE, "read"),
        (opcode::PollAdd::CODE, "poll"),
        (opcode::Shutdown::CODE, "shutdown"),
        (opcode::Close::CODE, "close"),
        (opcode::AsyncCancel2::CODE, "async cancel"),
        (opcode::Timeout::CODE, "timeout"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(format!(
                "this kernel's io_uring lacks the {name} operation ({release}); ringgate needs Linux {}.{}+",
                KERNEL_MIN.0, KERNEL_MIN.1
            ));
        }
    }
    Ok(Features {
        multishot_timeout: version >= MULTISHOT_TIMEOUT_MIN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_passes_and_reports_its_features() {
        let features = check().expect("the test machine runs a supported kernel");
        let (_, version) = sys::kernel_version();
        assert_eq!(features.multishot_timeout, version >= MULTISHOT_TIMEOUT_MIN);
    }
}
