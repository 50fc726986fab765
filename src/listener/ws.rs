//! MQTT over WebSocket: the HTTP upgrade on path `/mqtt` with subprotocol `mqtt` (or the legacy
//! `mqttv3.1`), then the binary messages read and written as one byte stream, so the same session
//! code serves MQTT 3.1.1 and 5 over WebSocket.

use async_tungstenite::tokio::{accept_hdr_async_with_config, TokioAdapter};
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use ws_stream_tungstenite::WsStream;

use super::HandshakeError;

/// The only path MQTT is served on.
pub const PATH: &str = "/mqtt";

/// Subprotocols accepted, in order of preference.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Upgrades `stream` to a WebSocket and returns it as an MQTT byte stream. The caller bounds it
/// with the handshake timeout.
pub async fn accept<S>(
    stream: S,
    max_message: usize,
) -> Result<WsStream<TokioAdapter<S>>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let config = WebSocketConfig {
        max_message_size: Some(max_message),
        max_frame_size: Some(max_message),
        ..Default::default()
    };
    let ws = accept_hdr_async_with_config(stream, negotiate, Some(config))
        .await
        .map_err(|e| HandshakeError(format!("WebSocket: {e}")))?;
    Ok(WsStream::new(ws))
}

/// Checks the path and picks the subprotocol.
// The signature is tungstenite's handshake callback; the large error is its HTTP response.
#[allow(clippy::result_large_err)]
fn negotiate(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() != PATH {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("MQTT is served on {PATH}"),
        ));
    }
    let offered: Vec<&str> = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if offered.is_empty() {
        // Some clients send no subprotocol at all; the stream is MQTT all the same.
        return Ok(response);
    }
    let Some(chosen) = SUBPROTOCOLS.iter().find(|p| offered.contains(p)) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol must be mqtt".into(),
        ));
    };
    response
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
    Ok(response)
}

#[allow(clippy::result_large_err)]
fn refuse(status: StatusCode, why: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, protocols: Option<&str>) -> Request {
        let mut builder = Request::builder().uri(path);
        if let Some(p) = protocols {
            builder = builder.header("Sec-WebSocket-Protocol", p);
        }
        builder.body(()).expect("valid request")
    }

    #[test]
    fn picks_mqtt_and_refuses_other_paths() {
        let ok =
            negotiate(&request("/mqtt", Some("foo, mqtt")), Response::new(())).expect("accepted");
        assert_eq!(ok.headers()["sec-websocket-protocol"], "mqtt");
        let err = negotiate(&request("/other", Some("mqtt")), Response::new(())).unwrap_err();
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        let err = negotiate(&request("/mqtt", Some("chat")), Response::new(())).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
}
