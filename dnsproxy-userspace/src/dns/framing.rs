//! DNS over TCP framing (RFC 1035 §4.2.2, RFC 7766 §8): every message is preceded by
//! its length as two bytes in network order. Server and forwarder both use these.
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Reads one framed message; `Ok(None)` on a clean end of stream before a frame.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    reader.read_exact(&mut message).await?;
    Ok(Some(message))
}

/// Writes `message` with its length prefix, in one write.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a DNS message over TCP is at most 65535 bytes",
        )
    })?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    writer.write_all(&framed).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_clean_end() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"abc").await.unwrap();
        write_frame(&mut wire, b"").await.unwrap();
        assert_eq!(wire, [0, 3, b'a', b'b', b'c', 0, 0]);
        let mut reader = &wire[..];
        assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), b"abc");
        assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), b"");
        assert!(read_frame(&mut reader).await.unwrap().is_none());
        let mut short = &[0u8, 5, 1][..];
        assert!(
            read_frame(&mut short).await.is_err(),
            "a cut frame is an error"
        );
        assert!(
            write_frame(&mut Vec::new(), &vec![0; 70_000])
                .await
                .is_err()
        );
    }
}
