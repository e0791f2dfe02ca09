//! TLS for the admin command's connections, as `DATABASE_URL`'s `sslmode`
//! and `sslrootcert` ask, with libpq's meanings:
//!
//! | `sslmode` | TLS | the server's certificate |
//! | --- | --- | --- |
//! | `disable` | never | - |
//! | `allow`, `prefer` (the default) | when the server offers it | not verified |
//! | `require` | always | not verified; verified as for `verify-ca` when `sslrootcert` is given |
//! | `verify-ca` | always | signed by a trusted root |
//! | `verify-full` | always | signed by a trusted root and issued to the host connected to |
//!
//! The trusted roots are the certificates in `sslrootcert=<file>` (PEM), or
//! without it (or with `sslrootcert=system`) the Mozilla roots bundled by
//! `webpki-roots`. tokio-postgres knows neither `verify-*` nor
//! `sslrootcert`, so both are taken out of the string before it is parsed.

use std::error::Error;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// What is checked of the server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndHost,
}

/// Parses a connection string (a `postgres://` URL or `key=value` pairs)
/// into the connection settings and the TLS connector its `sslmode` asks
/// for. The error is a sentence for the user.
pub(crate) fn connection_settings(text: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect), String> {
    let (rest, ssl_mode, root_cert) = take_tls_parameters(text)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|error| format!("invalid DATABASE_URL: {error}"))?;
    let (mode, verify) = match ssl_mode.as_deref() {
        None | Some("prefer" | "allow") => (SslMode::Prefer, Verify::Nothing),
        Some("disable") => (SslMode::Disable, Verify::Nothing),
        // As libpq: a root certificate given makes `require` verify the chain.
        Some("require") if root_cert.is_some() => (SslMode::Require, Verify::Chain),
        Some("require") => (SslMode::Require, Verify::Nothing),
        Some("verify-ca") => (SslMode::Require, Verify::Chain),
        Some("verify-full") => (SslMode::Require, Verify::ChainAndHost),
        Some(other) => {
            return Err(format!(
                "invalid DATABASE_URL: sslmode={other} is not one of disable, allow, prefer, require, verify-ca, \
                 verify-full"
            ))
        }
    };
    config.ssl_mode(mode);
    let roots = match verify {
        Verify::Nothing => None,
        Verify::Chain | Verify::ChainAndHost => Some(Arc::new(trusted_roots(root_cert.as_deref())?)),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = ServerCertificate {
        roots,
        check_host: verify == Verify::ChainAndHost,
        algorithms: provider.signature_verification_algorithms,
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("cannot set up TLS: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((config, MakeRustlsConnect::new(tls)))
}

/// The roots to verify the server's certificate against.
fn trusted_roots(root_cert: Option<&str>) -> Result<RootCertStore, String> {
    let Some(path) = root_cert.filter(|path| *path != "system") else {
        return Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    };
    let unreadable = |error: &dyn std::fmt::Display| format!("cannot read sslrootcert={path}: {error}");
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(path).map_err(|error| unreadable(&error))? {
        let certificate = certificate.map_err(|error| unreadable(&error))?;
        roots.add(certificate).map_err(|error| unreadable(&error))?;
    }
    if roots.is_empty() {
        return Err(unreadable(&"no PEM certificate in it"));
    }
    Ok(roots)
}

/// Verifies the server's certificate as far as `sslmode` asks; the
/// handshake's signatures are always verified, so that the session is
/// bound to the certificate's key.
#[derive(Debug)]
struct ServerCertificate {
    roots: Option<Arc<RootCertStore>>,
    check_host: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let certificate = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&certificate, roots, intermediates, now, self.algorithms.all)?;
        if self.check_host {
            verify_server_name(&certificate, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What to do about a refused server certificate somewhere in `error`'s
/// causes, if that is what went wrong.
pub(crate) fn certificate_advice(error: &(dyn Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        // tokio-rustls wraps rustls' error in an io::Error, whose `source`
        // skips it.
        let refused = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(problem)) = refused {
            return Some(advice(problem));
        }
        cause = current.source();
    }
    None
}

fn advice(problem: &CertificateError) -> String {
    match problem {
        CertificateError::UnknownIssuer => "the server's certificate is not signed by a trusted certificate \
                                            authority: name the CA's certificate with sslrootcert=<file> in \
                                            DATABASE_URL (sslmode=require encrypts without verifying)"
            .to_owned(),
        CertificateError::NotValidForNameContext { expected, presented } => format!(
            "the server's certificate is not valid for the host {} (it names {}): connect by a name it names, \
             or use sslmode=verify-ca to verify the certificate but not the host",
            expected.to_str(),
            if presented.is_empty() {
                "no host".to_owned()
            } else {
                presented
                    .iter()
                    .map(|name| {
                        // rustls presents a DNS name as `DnsName("db.example.com")`.
                        let dns = name
                            .strip_prefix("DnsName(\"")
                            .and_then(|rest| rest.strip_suffix("\")"));
                        dns.unwrap_or(name)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        CertificateError::NotValidForName => "the server's certificate is not valid for the host connected to: \
                                              connect by a name it names, or use sslmode=verify-ca to verify the \
                                              certificate but not the host"
            .to_owned(),
        other => format!("the server's certificate was refused: {other}"),
    }
}

/// Takes `sslmode` and `sslrootcert` out of a connection string; returns
/// the rest and their values.
fn take_tls_parameters(text: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let mut ssl_mode = None;
    let mut root_cert = None;
    let mut keep = |key: &str, value: String| {
        match key {
            "sslmode" => ssl_mode = Some(value),
            "sslrootcert" => root_cert = Some(value),
            _ => return true,
        }
        false
    };
    let rest = if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        let Some((base, query)) = text.split_once('?') else {
            return Ok((text.to_owned(), None, None));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            if keep(&decode(key), decode(value)) {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (pair, key, value) in key_value_pairs(text)? {
            if keep(key, value) {
                kept.push(pair);
            }
        }
        kept.join(" ")
    };
    Ok((rest, ssl_mode, root_cert))
}

/// `key = value` pairs as libpq (and tokio-postgres) read them: each pair's
/// text, its key and its unescaped value.
fn key_value_pairs(text: &str) -> Result<Vec<(&str, &str, String)>, String> {
    let malformed = || "invalid DATABASE_URL: expected `key=value` pairs".to_owned();
    let mut pairs = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return Ok(pairs);
        };
        while chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=').is_some() {}
        let key_end = chars.peek().map_or(text.len(), |(at, _)| *at);
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(malformed());
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut closed = !quoted;
        while let Some((_, c)) = chars.next_if(|(_, c)| if quoted { true } else { !c.is_whitespace() }) {
            match c {
                '\\' => value.extend(chars.next().map(|(_, escaped)| escaped)),
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                c => value.push(c),
            }
        }
        if !closed {
            return Err(malformed());
        }
        let end = chars.peek().map_or(text.len(), |(at, _)| *at);
        pairs.push((&text[start..end], &text[start..key_end], value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_a_url_and_the_rest_of_its_query_untouched() {
        let (rest, mode, root) = take_tls_parameters(
            "postgres://u@h:5432/db?sslmode=verify-full&options=-c%20search_path%3Ds&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h:5432/db?options=-c%20search_path%3Ds");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_value_pairs() {
        let (rest, mode, root) =
            take_tls_parameters("host=h sslmode = verify-ca sslrootcert='/my certs/ca.pem' options='-c a=\\'b\\''")
                .unwrap();
        assert_eq!(rest, "host=h options='-c a=\\'b\\''");
        assert_eq!(mode.as_deref(), Some("verify-ca"));
        assert_eq!(root.as_deref(), Some("/my certs/ca.pem"));
        assert!(take_tls_parameters("host=h sslmode").is_err());
        assert!(take_tls_parameters("host='h").is_err());
    }

    #[test]
    fn an_unknown_sslmode_is_refused_by_name() {
        let error = connection_settings("postgres://u@h/db?sslmode=strict").err().unwrap();
        assert!(error.contains("sslmode=strict"), "{error}");
    }
}
