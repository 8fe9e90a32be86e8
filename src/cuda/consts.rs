//! Sizes both the host code and the kernels depend on, defined here alone: every kernel unit is
//! compiled with [`defines`] in front of its source, so the two sides cannot disagree.

macro_rules! shared {
    ($($(#[$doc:meta])* $name:ident = $v:expr;)*) => {
        $($(#[$doc])* pub const $name: usize = $v;)*
        /// The constants as `#define`s, for the front of every kernel unit.
        pub fn defines() -> String {
            let mut s = String::new();
            $(s += &format!("#define {} {}\n", stringify!($name), $name);)*
            s
        }
    };
}

shared! {
    /// rms_norm.cu's add_norm: values of a row per thread (of at most 1024 threads).
    NORM_VALUES = 8;
    /// causal_conv1d.cu: steps per thread of the backward, and the widest kernel.
    CONV_RUN = 16;
    CONV_MAX_W = 8;
    /// selective_scan.cu's scan_step: the most states per channel, sequences and channels per block.
    SCAN_STEP_N = 16;
    SCAN_STEP_SEQS = 2;
    SCAN_STEP_CHANNELS = 128;
    /// selective_scan.cu's ssd_step (Mamba-2's batched decode step): channels per block, the ways
    /// each channel's states are split (threads = their product), the most states.
    SSD_STEP_CHANNELS = 64;
    SSD_STEP_SPLIT = 8;
    SSD_STEP_NMAX = 256;
    /// selective_scan_backward.cu: steps per sub-chunk (the kept states' spacing), the plain
    /// kernel's block size and most states per channel, the fast kernel's block size and states
    /// per lane (a float4).
    SCAN_BWD_SUB = 8;
    SCAN_BWD_THREADS = 256;
    SCAN_BWD_MAX_N = 32;
    SCAN_BWD_LANE_THREADS = 128;
    SCAN_BWD_SPL = 4;
    /// ssd.cu: the chunk length and the tiles' most states and head channels.
    SSD_Q = 64;
    SSD_NMAX = 128;
    SSD_PMAX = 64;
    /// decode.cu: block size; a chunk is STEP_PF 16-byte pieces per lane, STEP_NST chunks in flight
    /// per warp; Mamba-1's and Mamba-2's most states; row values per thread of the norm; epochs a
    /// launch may use (hand-overs per token and the final barrier, at most).
    STEP_THREADS = 512;
    STEP_PF = 4;
    STEP_NST = 3;
    STEP_M1_N = 16;
    STEP_M2_MAX_N = 256;
    STEP_NORM_PT = 8;
    STEP_EPOCHS = 4096;
}
