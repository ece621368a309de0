def check_stream(): pass
class Finding: pass
