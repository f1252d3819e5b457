def test_module_loads(loaders, relay_ns):
    with relay_ns.entered():
        out = loaders.modules.relayroute.show()
    assert out["relay"] == {"rules": [], "routes": [], "iptables": []}
