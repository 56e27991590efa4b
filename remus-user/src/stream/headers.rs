//! Checks of the stream's fixed headers (xl, libxl, libxc image and domain), each over
//! the whole header's bytes. Pure.
//!
//! Owns: what a valid header holds. Never touches: parser state (the parser moves on).
use super::{
    DomainType, Field, LIBXC_ID, LIBXC_MARKER, LIBXC_OPT_BIG_ENDIAN, LIBXL_IDENT,
    LIBXL_OPT_BIG_ENDIAN, LIBXL_VERSION, StreamError, XL_BYTEORDER, XL_FLAG_JSON, XL_FLAG_STREAMV2,
    XL_MAGIC, XL_OPTIONAL_DATA_MAX, be32, be64, le32,
};

/// The 48-byte xl header starting at `at`. Returns the optional data length.
pub(super) fn xl_fixed(b: &[u8], at: u64) -> Result<u32, StreamError> {
    if let Some(i) = b[..32]
        .iter()
        .zip(XL_MAGIC.iter())
        .position(|(a, m)| a != m)
    {
        return Err(StreamError::field(at + i as u64, Field::XlMagic, b[i]));
    }
    let order = le32(b, 32);
    if order != XL_BYTEORDER {
        return Err(StreamError::field(at + 32, Field::XlByteOrder, order));
    }
    let mandatory = le32(b, 36);
    let unknown = mandatory & !(XL_FLAG_JSON | XL_FLAG_STREAMV2);
    if unknown != 0 {
        return Err(StreamError::field(
            at + 36,
            Field::XlMandatoryFlags,
            unknown,
        ));
    }
    if mandatory & XL_FLAG_STREAMV2 == 0 {
        return Err(StreamError::field(at + 36, Field::XlLegacyV1, mandatory));
    }
    // optional_flags (b[40..44]): xl 4.17 defines none and does not check them.
    let opt_len = le32(b, 44);
    if opt_len > XL_OPTIONAL_DATA_MAX {
        return Err(StreamError::field(
            at + 44,
            Field::XlOptionalDataLen,
            opt_len,
        ));
    }
    if (1..=3).contains(&opt_len) {
        return Err(StreamError::field(
            at + 44,
            Field::XlOptionalDataShort,
            opt_len,
        ));
    }
    Ok(opt_len)
}

/// The u32 config length at the start of `opt_len` bytes of optional data. Returns it and
/// the optional data left after the length.
pub(super) fn xl_config_len(b: &[u8], at: u64, opt_len: u32) -> Result<(u32, u64), StreamError> {
    let config_len = le32(b, 0);
    let left = opt_len - 4;
    if config_len > left {
        return Err(StreamError::ConfigTooLong {
            pos: at,
            config_len,
            left,
        });
    }
    Ok((config_len, u64::from(left)))
}

/// The 16-byte libxl header.
pub(super) fn libxl(b: &[u8], at: u64) -> Result<(), StreamError> {
    let ident = be64(b, 0);
    if ident != LIBXL_IDENT {
        return Err(StreamError::field(at, Field::LibxlIdent, ident));
    }
    let version = be32(b, 8);
    if version != LIBXL_VERSION {
        return Err(StreamError::field(at + 8, Field::LibxlVersion, version));
    }
    let options = be32(b, 12);
    if options & LIBXL_OPT_BIG_ENDIAN != 0 {
        return Err(StreamError::field(at + 12, Field::LibxlBigEndian, options));
    }
    Ok(())
}

/// The 24-byte libxc image header (version 2 is still accepted, as Xen does).
pub(super) fn libxc_image(b: &[u8], at: u64) -> Result<(), StreamError> {
    let marker = be64(b, 0);
    if marker != LIBXC_MARKER {
        return Err(StreamError::field(at, Field::LibxcMarker, marker));
    }
    let id = be32(b, 8);
    if id != LIBXC_ID {
        return Err(StreamError::field(at + 8, Field::LibxcId, id));
    }
    let version = be32(b, 12);
    if !(2..=3).contains(&version) {
        return Err(StreamError::field(at + 12, Field::LibxcVersion, version));
    }
    let options = u16::from_be_bytes([b[16], b[17]]);
    if options & LIBXC_OPT_BIG_ENDIAN != 0 {
        return Err(StreamError::field(at + 16, Field::LibxcBigEndian, options));
    }
    Ok(())
}

/// The 16-byte libxc domain header: the guest type.
pub(super) fn libxc_domain(b: &[u8], at: u64) -> Result<DomainType, StreamError> {
    let domain = match le32(b, 0) {
        1 => DomainType::X86Pv,
        2 => DomainType::X86Hvm,
        t => return Err(StreamError::field(at, Field::DomainType, t)),
    };
    let page_shift = u16::from_le_bytes([b[4], b[5]]);
    if page_shift != 12 {
        return Err(StreamError::field(at + 4, Field::PageShift, page_shift));
    }
    Ok(domain)
}
