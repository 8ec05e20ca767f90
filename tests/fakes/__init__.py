"""Local stand-ins for third-party services (APNs, FCM), served on 127.0.0.1 for tests."""
