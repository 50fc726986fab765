"""MQTT over WebSocket with paho-mqtt: subscribe, publish to the same topic, receive it, disconnect.

Usage: ws_paho.py PORT VERSION(311|5) CLIENT_ID USERNAME PASSWORD TOPIC
Exit 0 only if the message came back; any failure prints why and exits 1.
"""
import sys
import threading

import paho.mqtt.client as mqtt

WAIT = 5.0


def main() -> int:
    port, version, client_id, username, password, topic = sys.argv[1:7]
    protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        transport="websockets",
    )
    client.ws_set_options(path="/mqtt")
    client.username_pw_set(username, password)
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    failure = []

    def on_connect(_c, _u, _flags, reason_code, _props):
        if reason_code.is_failure:
            failure.append(f"CONNACK {reason_code}")
        connected.set()

    def on_subscribe(_c, _u, _mid, reason_codes, _props):
        if any(rc.is_failure for rc in reason_codes):
            failure.append(f"SUBACK {reason_codes}")
        subscribed.set()

    def on_message(_c, _u, message):
        if message.payload == b"paho-ws":
            received.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect("127.0.0.1", int(port), keepalive=30)
    client.loop_start()
    try:
        for step, event in (("connect", connected), ("subscribe", None), ("message", received)):
            if step == "subscribe":
                client.subscribe(topic, qos=1)
                event = subscribed
                if not event.wait(WAIT):
                    print("no SUBACK", file=sys.stderr)
                    return 1
                client.publish(topic, b"paho-ws", qos=1)
                continue
            if not event.wait(WAIT) or failure:
                print(f"{step} failed: {failure}", file=sys.stderr)
                return 1
        return 0
    finally:
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
