"""How bytes reach a session: the WebSocket, a WebRTC call, the call's outgoing audio track."""
