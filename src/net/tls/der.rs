//! Just enough ASN.1 to take what smtpstorm shows or uses out of an X.509
//! certificate: the version, the SubjectPublicKeyInfo, and the subject,
//! issuer and expiry `probe` prints.
//!
//! Elements are read with BER's length rules (long-form lengths that are not
//! minimal and indefinite lengths pass; certificates in the wild are not all
//! strict DER), nothing is interpreted beyond the fields asked for, and any
//! input, however malformed, gives `None`, never a panic.
//!
//! The text forms are the ones x509-parser printed before it was replaced by
//! this module: a name is its relative distinguished names in certificate
//! order joined by `", "` (attributes of one RDN by `" + "`), each attribute
//! `TYPE=value` with the short type names below (unknown types in dotted
//! decimal) and a value that is not a string in upper-case hex; a time is
//! `Mar  5 00:00:00 2031 +00:00` (UTC).

/// The class of an element's tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    Universal,
    Application,
    ContextSpecific,
    Private,
}

/// Universal tag numbers used here.
pub(super) const INTEGER: u32 = 2;
pub(super) const BIT_STRING: u32 = 3;
const OID: u32 = 6;
const UTF8_STRING: u32 = 12;
pub(super) const SEQUENCE: u32 = 16;
const SET: u32 = 17;
const UTC_TIME: u32 = 23;
const GENERALIZED_TIME: u32 = 24;
const BMP_STRING: u32 = 30;

/// One element: its tag and its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tlv<'a> {
    pub class: Class,
    pub constructed: bool,
    pub tag: u32,
    /// The contents octets (for an indefinite length, without the
    /// end-of-contents marker).
    pub data: &'a [u8],
}

impl Tlv<'_> {
    /// True for the universal tag `tag`.
    pub fn is(&self, tag: u32) -> bool {
        self.class == Class::Universal && self.tag == tag
    }
}

/// How deep indefinite lengths may nest before the input is refused.
const MAX_DEPTH: u32 = 32;

/// The first element of `der` and what follows it.
pub(super) fn tlv(der: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    tlv_at_depth(der, MAX_DEPTH)
}

fn tlv_at_depth(der: &[u8], depth: u32) -> Option<(Tlv<'_>, &[u8])> {
    let (&id, mut rest) = der.split_first()?;
    let class = match id >> 6 {
        0 => Class::Universal,
        1 => Class::Application,
        2 => Class::ContextSpecific,
        _ => Class::Private,
    };
    let constructed = id & 0x20 != 0;
    let mut tag = u32::from(id & 0x1f);
    if tag == 0x1f {
        // High tag number: base 128, most significant group first.
        tag = 0;
        loop {
            let (&b, r) = rest.split_first()?;
            rest = r;
            tag = tag.checked_mul(128)? | u32::from(b & 0x7f);
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    let (&len, mut rest) = rest.split_first()?;
    let length = match len {
        0..=0x7f => usize::from(len),
        0x80 => {
            // Indefinite: the elements inside, up to end-of-contents.
            if !constructed || depth == 0 {
                return None;
            }
            let mut inner = rest;
            loop {
                let (el, after) = tlv_at_depth(inner, depth - 1)?;
                if el.class == Class::Universal && el.tag == 0 && !el.constructed {
                    let data = &rest[..rest.len() - inner.len()];
                    let tlv = Tlv {
                        class,
                        constructed,
                        tag,
                        data,
                    };
                    return Some((tlv, after));
                }
                inner = after;
            }
        }
        0xff => return None,
        _ => {
            let mut n: usize = 0;
            for _ in 0..(len & 0x7f) {
                let (&b, r) = rest.split_first()?;
                rest = r;
                n = n.checked_mul(256)? | usize::from(b);
            }
            n
        }
    };
    if rest.len() < length {
        return None;
    }
    let (data, after) = rest.split_at(length);
    Some((
        Tlv {
            class,
            constructed,
            tag,
            data,
        },
        after,
    ))
}

/// The fields of a certificate's TBSCertificate that smtpstorm looks at.
pub(super) struct TbsFields<'a> {
    /// 1, 2 or 3 (the encoded value plus one: it may be anything).
    pub version: u32,
    pub issuer: Tlv<'a>,
    pub validity: Tlv<'a>,
    pub subject: Tlv<'a>,
    /// The SubjectPublicKeyInfo, outer SEQUENCE included.
    pub spki: &'a [u8],
}

/// Reads the TBSCertificate of a certificate field by field, interpreting
/// nothing but its shape (the names, dates and extensions may be anything).
pub(super) fn tbs_fields(cert: &[u8]) -> Option<TbsFields<'_>> {
    let (cert, _) = tlv(cert).filter(|(c, _)| c.is(SEQUENCE))?;
    let (tbs, _) = tlv(cert.data).filter(|(t, _)| t.is(SEQUENCE))?;
    let mut rest = tbs.data;
    // version [0] EXPLICIT INTEGER DEFAULT v1(0)
    let (first, after) = tlv(rest)?;
    let mut version = 1;
    if first.class == Class::ContextSpecific && first.tag == 0 {
        let (v, _) = tlv(first.data).filter(|(v, _)| v.is(INTEGER))?;
        // 0, 1, 2 for v1, v2, v3: one byte.
        version = match v.data {
            [n] => u32::from(*n) + 1,
            _ => return None,
        };
        rest = after;
    }
    // serialNumber, signature
    for _ in 0..2 {
        rest = tlv(rest)?.1;
    }
    let (issuer, rest) = tlv(rest)?;
    let (validity, rest) = tlv(rest)?;
    let (subject, rest) = tlv(rest)?;
    let (_, after) = tlv(rest).filter(|(spki, _)| spki.is(SEQUENCE))?;
    Some(TbsFields {
        version,
        issuer,
        validity,
        subject,
        spki: &rest[..rest.len() - after.len()],
    })
}

/// A Name as text (see the module's description); `None` if it is not a
/// SEQUENCE OF SET OF { OID, value }.
pub(super) fn name_text(name: &Tlv<'_>) -> Option<String> {
    if !name.is(SEQUENCE) {
        return None;
    }
    let mut out = String::new();
    let mut rdns = name.data;
    while !rdns.is_empty() {
        let (rdn, rest) = tlv(rdns).filter(|(r, _)| r.is(SET))?;
        rdns = rest;
        if !out.is_empty() {
            out.push_str(", ");
        }
        let mut attrs = rdn.data;
        let mut first = true;
        while !attrs.is_empty() {
            let (attr, rest) = tlv(attrs).filter(|(a, _)| a.is(SEQUENCE))?;
            attrs = rest;
            let (oid, value) = tlv(attr.data).filter(|(o, _)| o.is(OID))?;
            let (value, _) = tlv(value)?;
            if !first {
                out.push_str(" + ");
            }
            first = false;
            match attribute_name(oid.data) {
                Some(n) => out.push_str(n),
                None => out.push_str(&oid_text(oid.data)?),
            }
            out.push('=');
            out.push_str(&value_text(&value)?);
        }
    }
    Some(out)
}

/// The short names of the attribute types a Name may hold (the
/// abbreviations x509-parser used, then oid-registry's short names), by
/// the contents octets of their OID.
const ATTRIBUTE_NAMES: &[(&[u8], &str)] = &[
    (&[0x55, 0x04, 0x03], "CN"),
    (&[0x55, 0x04, 0x06], "C"),
    (&[0x55, 0x04, 0x07], "L"),
    (&[0x55, 0x04, 0x08], "ST"),
    (&[0x55, 0x04, 0x0a], "O"),
    (&[0x55, 0x04, 0x0b], "OU"),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
        "DC",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
        "Email",
    ),
    (&[0x55, 0x04, 0x00], "objectClass"),
    (&[0x55, 0x04, 0x01], "aliasedEntryName"),
    (&[0x55, 0x04, 0x02], "knowledgeInformation"),
    (&[0x55, 0x04, 0x04], "surname"),
    (&[0x55, 0x04, 0x05], "serialNumber"),
    (&[0x55, 0x04, 0x09], "streetAddress"),
    (&[0x55, 0x04, 0x0c], "title"),
    (&[0x55, 0x04, 0x0d], "description"),
    (&[0x55, 0x04, 0x0e], "searchGuide"),
    (&[0x55, 0x04, 0x0f], "businessCategory"),
    (&[0x55, 0x04, 0x10], "postalAddress"),
    (&[0x55, 0x04, 0x11], "postalCode"),
    (&[0x55, 0x04, 0x29], "name"),
    (&[0x55, 0x04, 0x2a], "givenName"),
    (&[0x55, 0x04, 0x2b], "initials"),
    (&[0x55, 0x04, 0x2c], "generationQualifier"),
    (&[0x55, 0x04, 0x2d], "uniqueIdentifier"),
    (&[0x55, 0x04, 0x2e], "dnQualifier"),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
        "uid",
    ),
    (
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x02],
        "unstructuredName",
    ),
    (
        &[
            0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x3c, 0x02, 0x01, 0x01,
        ],
        "msJurisdictionLocality",
    ),
    (
        &[
            0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x3c, 0x02, 0x01, 0x02,
        ],
        "msJurisdictionStateOrProvince",
    ),
    (
        &[
            0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x3c, 0x02, 0x01, 0x03,
        ],
        "msJurisdictionCountry",
    ),
];

fn attribute_name(oid: &[u8]) -> Option<&'static str> {
    ATTRIBUTE_NAMES
        .iter()
        .find(|(o, _)| *o == oid)
        .map(|(_, n)| *n)
}

/// An OID's contents octets in dotted decimal (`2.5.4.97`).
fn oid_text(oid: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut arc: u64 = 0;
    let mut first = true;
    for (i, &b) in oid.iter().enumerate() {
        arc = arc.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 != 0 {
            if i + 1 == oid.len() {
                return None;
            }
            continue;
        }
        if first {
            // The first subidentifier packs the first two arcs.
            let (a, b) = match arc {
                0..=39 => (0, arc),
                40..=79 => (1, arc - 40),
                _ => (2, arc - 80),
            };
            out.push_str(&format!("{a}.{b}"));
            first = false;
        } else {
            out.push_str(&format!(".{arc}"));
        }
        arc = 0;
    }
    (!first).then_some(out)
}

/// An attribute value: the text of a string type, upper-case hex of the
/// contents otherwise; `None` for a string that does not decode.
fn value_text(value: &Tlv<'_>) -> Option<String> {
    if value.class != Class::Universal {
        return Some(hex_upper(value.data));
    }
    match value.tag {
        // NumericString, PrintableString, T61String, VideotexString,
        // IA5String, GraphicString, VisibleString, GeneralString,
        // ObjectDescriptor, UTF8String: read as UTF-8 (as before).
        7 | UTF8_STRING | 18..=22 | 25..=27 => {
            std::str::from_utf8(value.data).ok().map(str::to_string)
        }
        BMP_STRING => {
            if !value.data.len().is_multiple_of(2) {
                return None;
            }
            let units = value
                .data
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => Some(hex_upper(value.data)),
    }
}

fn hex_upper(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// notAfter of a Validity (`SEQUENCE { notBefore Time, notAfter Time }`)
/// in Unix seconds.
pub(super) fn not_after_unix(validity: &Tlv<'_>) -> Option<i64> {
    if !validity.is(SEQUENCE) {
        return None;
    }
    let (_, rest) = tlv(validity.data)?;
    let (not_after, _) = tlv(rest)?;
    time_unix(&not_after)
}

/// A UTCTime (`YYMMDDhhmm[ss]`, years 50-99 in the 1900s) or a
/// GeneralizedTime (`YYYYMMDDhhmm[ss[.fff]]`), each ending in `Z` or a
/// `±hhmm` offset, in Unix seconds (fractions dropped).
fn time_unix(t: &Tlv<'_>) -> Option<i64> {
    let s = t.data;
    let digits = |from: usize, n: usize| -> Option<i64> {
        let d = s.get(from..from + n)?;
        d.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, mut at) = if t.is(UTC_TIME) {
        let yy = digits(0, 2)?;
        (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
    } else if t.is(GENERALIZED_TIME) {
        (digits(0, 4)?, 4)
    } else {
        return None;
    };
    let month = digits(at, 2)?;
    let day = digits(at + 2, 2)?;
    let hour = digits(at + 4, 2)?;
    let minute = digits(at + 6, 2)?;
    at += 8;
    let mut second = 0;
    if let Some(sec) = digits(at, 2) {
        second = sec;
        at += 2;
        if t.is(GENERALIZED_TIME) && matches!(s.get(at), Some(b'.' | b',')) {
            at += 1;
            let frac = s[at..].iter().take_while(|c| c.is_ascii_digit()).count();
            if frac == 0 {
                return None;
            }
            at += frac;
        }
    }
    let offset = match s.get(at..)? {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, _, _] => {
            let (h, m) = (digits(at + 1, 2)?, digits(at + 3, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3600 + m * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`]: `(year, month, day)`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Unix seconds as `Mar  5 00:00:00 2031 +00:00`.
pub(super) fn time_text(unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{} {d:>2} {:02}:{:02}:{:02} {y} +00:00",
        MONTHS[(m - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn universal(tag: u32, data: &[u8]) -> Tlv<'_> {
        Tlv {
            class: Class::Universal,
            constructed: false,
            tag,
            data,
        }
    }

    #[test]
    fn lengths_are_read_in_every_form_and_overruns_refused() {
        // Short form, then what follows.
        let (t, rest) = tlv(&[0x02, 0x01, 0x05, 0xaa]).unwrap();
        assert_eq!(
            (t.is(INTEGER), t.data, rest),
            (true, &[5u8][..], &[0xaa][..])
        );
        // Long form, also when not minimal.
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7, 256));
        assert_eq!(tlv(&long).unwrap().0.data.len(), 256);
        assert_eq!(tlv(&[0x04, 0x81, 0x01, 0x09]).unwrap().0.data, &[9]);
        // Indefinite (constructed only), nested, ended by 00 00.
        let indef = [
            0x30, 0x80, 0x30, 0x80, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0xee,
        ];
        let (t, rest) = tlv(&indef).unwrap();
        assert_eq!(t.data, &[0x30, 0x80, 0x05, 0x00, 0x00, 0x00]);
        assert_eq!(rest, &[0xee]);
        // High tag number form: [APPLICATION 200].
        let (t, _) = tlv(&[0x5f, 0x81, 0x48, 0x00]).unwrap();
        assert_eq!((t.class, t.tag), (Class::Application, 200));
        for bad in [
            &[][..],
            &[0x02],
            &[0x02, 0x02, 0x01],
            &[0x02, 0x80, 0x00, 0x00],
            &[0x30, 0x80, 0x05, 0x00],
            &[0x04, 0xff, 0x00],
            &[0x04, 0x89, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0x1f, 0x81],
        ] {
            assert_eq!(tlv(bad), None, "{bad:02x?}");
        }
        // Indefinite lengths nested past the limit are refused, not recursed.
        let deep: Vec<u8> = std::iter::repeat_n([0x30, 0x80], 100).flatten().collect();
        assert_eq!(tlv(&deep), None);
    }

    #[test]
    fn oids_print_in_dotted_decimal() {
        assert_eq!(oid_text(&[0x55, 0x04, 0x61]).unwrap(), "2.5.4.97");
        assert_eq!(
            oid_text(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]).unwrap(),
            "1.2.840.113549"
        );
        assert_eq!(oid_text(&[0x27]).unwrap(), "0.39");
        assert_eq!(oid_text(&[0x88, 0x37]).unwrap(), "2.999");
        assert_eq!(oid_text(&[]), None);
        assert_eq!(oid_text(&[0x55, 0x84]), None);
    }

    #[test]
    fn values_that_are_not_strings_print_in_hex() {
        let v = |tag, data| value_text(&universal(tag, data));
        assert_eq!(v(19, b"Example CA").unwrap(), "Example CA");
        assert_eq!(v(UTF8_STRING, "Zürich".as_bytes()).unwrap(), "Zürich");
        assert_eq!(
            v(BMP_STRING, &[0, b'h', 0, b'i', 0x20, 0xac]).unwrap(),
            "hi€"
        );
        assert_eq!(v(BMP_STRING, &[0, b'h', 0]), None);
        assert_eq!(v(UTF8_STRING, &[0xff]), None);
        // UniversalString and INTEGER are not read as text.
        assert_eq!(v(28, &[0, 0, 0, 0x41]).unwrap(), "00000041");
        assert_eq!(v(INTEGER, &[0x0a, 0xbc]).unwrap(), "0ABC");
    }

    #[test]
    fn both_time_types_convert_to_unix_seconds_and_back_to_text() {
        let t = |tag, s: &str| time_unix(&universal(tag, s.as_bytes()));
        assert_eq!(t(UTC_TIME, "700101000000Z"), Some(0));
        assert_eq!(t(UTC_TIME, "491231235959Z"), Some(2_524_607_999));
        assert_eq!(t(UTC_TIME, "500101000000Z"), Some(-631_152_000));
        assert_eq!(t(UTC_TIME, "3103050000Z"), Some(1_930_435_200));
        assert_eq!(t(UTC_TIME, "310305000000+0100"), Some(1_930_435_200 - 3600));
        assert_eq!(t(GENERALIZED_TIME, "20310305000000Z"), Some(1_930_435_200));
        assert_eq!(
            t(GENERALIZED_TIME, "20310305000000.123Z"),
            Some(1_930_435_200)
        );
        assert_eq!(t(GENERALIZED_TIME, "20240229120000Z"), Some(1_709_208_000));
        for bad in [
            "",
            "310305000000",
            "311305000000Z",
            "310230000000Z",
            "230229000000Z",
            "310305240000Z",
            "31030500000aZ",
            "310305000000+2400",
            "310305000000Zjunk",
        ] {
            assert_eq!(t(UTC_TIME, bad), None, "{bad}");
        }
        assert_eq!(t(GENERALIZED_TIME, "20310305000000.Z"), None);
        assert_eq!(t(INTEGER, "700101000000Z"), None);

        assert_eq!(time_text(0), "Jan  1 00:00:00 1970 +00:00");
        assert_eq!(
            time_text(1_930_435_200 + 3723),
            "Mar  5 01:02:03 2031 +00:00"
        );
        assert_eq!(time_text(1_709_208_000), "Feb 29 12:00:00 2024 +00:00");
        assert_eq!(time_text(-631_152_000), "Jan  1 00:00:00 1950 +00:00");
        assert_eq!(time_text(2_556_143_999), "Dec 31 23:59:59 2050 +00:00");
        // Every day for 400 years round-trips.
        for days in -146_097..146_097 {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=days_in_month(y, m)).contains(&d), "{days}");
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
