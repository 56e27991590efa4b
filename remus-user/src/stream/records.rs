//! Which record may appear where: the layer grammar's rules, per phase. Pure.
//!
//! Owns: the per-phase rules of both record layers and the length rules (limit, markers
//! carry no body, emulator records carry their header). Never touches: parser state.
use super::{
    Current, Phase, REC_LENGTH_MAX, REC_TYPE_OPTIONAL, Rule, StreamError, libxc_type, libxl_type,
};

/// What kind of record a type is, once allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Carries no fields: Xen writes it with length 0.
    Marker,
    /// Starts with an 8-byte emulator header.
    Emulator,
    Plain,
}

/// Checks a record header: its length, and that its type may appear in `phase`.
pub(super) fn check(phase: Phase, hvm: bool, cur: Current) -> Result<(), StreamError> {
    let record = cur.id();
    let len = cur.body_len;
    if len > REC_LENGTH_MAX {
        return Err(StreamError::RecordTooLong {
            pos: cur.start + 4,
            record,
            len,
        });
    }
    if cur.rtype & REC_TYPE_OPTIONAL != 0 {
        return Ok(());
    }
    let misplaced = |rule| StreamError::Misplaced {
        pos: cur.start,
        record,
        rule,
    };
    let shape = match phase {
        Phase::LibxlStart => match cur.rtype {
            libxl_type::LIBXC_CONTEXT => Shape::Marker,
            _ => return Err(misplaced(Rule::BeforeLibxcContext)),
        },
        Phase::LibxlCheckpoint | Phase::LibxlTail => {
            libxl_rule(phase, hvm, cur.rtype).map_err(misplaced)?
        }
        Phase::Libxc => libxc_rule(hvm, cur.rtype).map_err(misplaced)?,
    };
    match shape {
        Shape::Marker if len != 0 => Err(StreamError::MarkerWithBody {
            pos: cur.start + 4,
            record,
            len,
        }),
        Shape::Emulator if len < 8 => Err(StreamError::EmulatorTooShort {
            pos: cur.start + 4,
            record,
            len,
        }),
        _ => Ok(()),
    }
}

/// libxl records after a libxc CHECKPOINT (until CHECKPOINT_END) or END (until END).
fn libxl_rule(phase: Phase, hvm: bool, rtype: u32) -> Result<Shape, Rule> {
    let in_checkpoint = phase == Phase::LibxlCheckpoint;
    match rtype {
        libxl_type::EMULATOR_XENSTORE_DATA | libxl_type::EMULATOR_CONTEXT if !hvm => {
            Err(Rule::EmulatorInPv)
        }
        libxl_type::EMULATOR_XENSTORE_DATA | libxl_type::EMULATOR_CONTEXT => Ok(Shape::Emulator),
        libxl_type::CHECKPOINT_END if in_checkpoint => Ok(Shape::Marker),
        libxl_type::END if !in_checkpoint => Ok(Shape::Marker),
        libxl_type::CHECKPOINT_END => Err(Rule::CheckpointEndAfterEnd),
        libxl_type::END => Err(Rule::EndInsideCheckpoint),
        libxl_type::LIBXC_CONTEXT => Err(Rule::LibxcContextTwice),
        libxl_type::CHECKPOINT_STATE => Err(Rule::ColoOnly),
        _ => Err(Rule::UnknownLibxl),
    }
}

/// libxc records of a checkpoint.
fn libxc_rule(hvm: bool, rtype: u32) -> Result<Shape, Rule> {
    use libxc_type::*;
    match rtype {
        END | VERIFY | CHECKPOINT | STATIC_DATA_END => Ok(Shape::Marker),
        PAGE_DATA | X86_TSC_INFO | X86_CPUID_POLICY | X86_MSR_POLICY => Ok(Shape::Plain),
        X86_PV_INFO | X86_PV_P2M_FRAMES | X86_PV_VCPU_BASIC | X86_PV_VCPU_EXTENDED
        | X86_PV_VCPU_XSAVE | SHARED_INFO | X86_PV_VCPU_MSRS => {
            if hvm {
                Err(Rule::PvInHvm)
            } else {
                Ok(Shape::Plain)
            }
        }
        HVM_CONTEXT | HVM_PARAMS => {
            if hvm {
                Ok(Shape::Plain)
            } else {
                Err(Rule::HvmInPv)
            }
        }
        TOOLSTACK => Err(Rule::Toolstack),
        CHECKPOINT_DIRTY_PFN_LIST => Err(Rule::DirtyPfnList),
        _ => Err(Rule::UnknownLibxc),
    }
}
